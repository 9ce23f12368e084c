//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.
//! Written here rather than shelling out to `cpio` so archives are
//! reproducible (fixed mtimes, owners and inode numbers) and need no tool.

/// Builds one newc archive in memory. The kernel accepts several archives
/// concatenated, which is how a cached base and a per-run part are joined.
#[derive(Debug, Default)]
pub struct CpioArchive {
    bytes: Vec<u8>,
    next_inode: u32,
}

const MODE_DIR: u32 = 0o040_000;
const MODE_FILE: u32 = 0o100_000;
const MODE_SYMLINK: u32 = 0o120_000;
const MODE_CHAR: u32 = 0o020_000;

impl CpioArchive {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            bytes: Vec::new(),
            next_inode: 1,
        }
    }

    /// Directory entries (0o755) for every parent of `path`, outermost
    /// first, so a file can be added at any depth. Directories the kernel
    /// already unpacked are kept as they are.
    pub fn parents(&mut self, path: &str) {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for depth in 1..parts.len() {
            self.dir(&parts[..depth].join("/"), 0o755);
        }
    }

    /// A directory (permissions `perm`, e.g. 0o755).
    pub fn dir(&mut self, path: &str, perm: u32) {
        self.entry(path, MODE_DIR | perm, &[], (0, 0));
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, MODE_FILE | perm, data, (0, 0));
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, MODE_SYMLINK | 0o777, target.as_bytes(), (0, 0));
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, MODE_CHAR | perm, &[], (major, minor));
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = path.trim_start_matches('/');
        let inode = self.next_inode;
        self.next_inode += 1;
        let nlink = if mode & MODE_DIR == MODE_DIR { 2 } else { 1 };
        self.header(inode, mode, nlink, data.len(), rdev, name);
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn header(&mut self, inode: u32, mode: u32, nlink: u32, size: usize, rdev: (u32, u32), name: &str) {
        let fields = [
            inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed for reproducible archives
            u32::try_from(size).unwrap_or(u32::MAX),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// Closes the archive with the trailer and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.header(0, 0, 1, 0, (0, 0), "TRAILER!!!");
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_carry_their_sizes() {
        let mut archive = CpioArchive::new();
        archive.dir("bin", 0o755);
        archive.file("/bin/hello", 0o755, b"hello\n");
        archive.symlink("sh", "busybox");
        archive.char_device("dev/console", 0o600, 5, 1);
        let bytes = archive.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The file entry: header, name "bin/hello\0" padded, then the data.
        let text = String::from_utf8_lossy(&bytes);
        let at = text.find("bin/hello").unwrap();
        let header = &text[at - 110..at];
        assert_eq!(&header[14..22], "000081ed", "mode is a regular file 0755");
        assert_eq!(&header[54..62], "00000006", "size is 6");
        assert_eq!(&header[94..102], "0000000a", "name size counts the NUL");
        assert!(text.contains("hello\n"));
        let console = text.find("dev/console").unwrap();
        let header = &text[console - 110..console];
        assert_eq!(&header[14..22], "00002180", "char device 0600");
        assert_eq!(&header[78..86], "00000005");
        assert_eq!(&header[86..94], "00000001");
        assert!(
            bytes.ends_with(b"TRAILER!!!\0\0\0\0"),
            "trailer, NUL, padded to 4"
        );
    }
}
