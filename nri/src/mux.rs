//! The NRI socket's multiplexer: one unix stream carries two logical byte
//! streams, each a ttrpc session. Every frame is an 8-byte header, the
//! logical connection's ID and the payload's length (both u32, big
//! endian), then the payload. There is no handshake and no close: a
//! session ends only with the socket.
//!
//! On connection [`PLUGIN_SERVICE_CONN`] the plugin serves the runtime's
//! calls; on [`RUNTIME_SERVICE_CONN`] the plugin calls the runtime.
//!
//! How messages are cut into frames matters to the runtime's reader
//! (containerd's, in Go): it hands each frame whole to a 4096-byte buffered
//! reader and fails on a frame that starts a message and is larger than
//! that buffer, and it cannot split a frame between two messages. So each
//! ttrpc message goes out alone: whole when it fits in [`FIRST_FRAME_MAX`]
//! bytes, else as its first [`FIRST_FRAME_MAX`] bytes and then the rest, as
//! the runtime's own writer sends them. Frames read are reassembled as a
//! byte stream per connection: a message may span frames.

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The logical connection on which the plugin serves the runtime.
pub const PLUGIN_SERVICE_CONN: u32 = 1;
/// The logical connection on which the plugin calls the runtime.
pub const RUNTIME_SERVICE_CONN: u32 = 2;

/// A frame's header: connection ID and payload length.
pub const HEADER_LEN: usize = 8;
/// The most a frame that starts a message may hold (see the module docs).
pub const FIRST_FRAME_MAX: usize = 4096;
/// The largest payload a frame may carry: a ttrpc header and the largest
/// ttrpc message.
pub const MAX_PAYLOAD: usize = 10 + (4 << 20);

/// Why the multiplexed socket could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The socket failed.
    #[error("reading the NRI socket")]
    Io(#[from] std::io::Error),
    /// A frame longer than any message could be.
    #[error("a frame on connection {conn} of {len} bytes is longer than the {MAX_PAYLOAD} a frame may be")]
    Oversized {
        /// The logical connection.
        conn: u32,
        /// The length its header gave.
        len: usize,
    },
}

/// The frames that carry one whole ttrpc message on `conn`, as bytes to write.
pub fn frames(conn: u32, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 2 * HEADER_LEN);
    let (first, rest) = message.split_at(message.len().min(FIRST_FRAME_MAX));
    for part in [first, rest] {
        if part.is_empty() {
            continue;
        }
        for chunk in part.chunks(MAX_PAYLOAD) {
            out.extend_from_slice(&conn.to_be_bytes());
            out.extend_from_slice(&u32::try_from(chunk.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(chunk);
        }
    }
    out
}

/// Reads the next frame: `None` at the end of the stream.
///
/// # Errors
/// The socket failing, the stream ending inside a frame, or a frame
/// longer than [`MAX_PAYLOAD`].
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<(u32, Vec<u8>)>, MuxError> {
    let mut header = [0u8; HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let conn = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(MuxError::Oversized { conn, len });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok(Some((conn, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(mut bytes: &[u8]) -> Vec<(u32, usize)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let conn = u32::from_be_bytes(bytes[0..4].try_into().unwrap());
            let len = u32::from_be_bytes(bytes[4..8].try_into().unwrap()) as usize;
            frames.push((conn, len));
            bytes = &bytes[HEADER_LEN + len..];
        }
        frames
    }

    #[test]
    fn a_small_message_is_one_frame() {
        let bytes = frames(RUNTIME_SERVICE_CONN, &[7u8; 100]);
        assert_eq!(parse(&bytes), [(2, 100)]);
        assert_eq!(&bytes[..8], &[0, 0, 0, 2, 0, 0, 0, 100]);
    }

    #[test]
    fn a_message_of_exactly_the_first_frame_is_one_frame() {
        assert_eq!(parse(&frames(1, &[0u8; FIRST_FRAME_MAX])), [(1, FIRST_FRAME_MAX)]);
    }

    #[test]
    fn a_large_message_is_its_first_4096_bytes_then_the_rest() {
        let message: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let bytes = frames(PLUGIN_SERVICE_CONN, &message);
        assert_eq!(parse(&bytes), [(1, 4096), (1, 10_000 - 4096)]);
        let mut joined = bytes[8..8 + 4096].to_vec();
        joined.extend_from_slice(&bytes[8 + 4096 + 8..]);
        assert_eq!(joined, message);
    }

    #[tokio::test]
    async fn frames_read_back_and_the_end_is_none() {
        let mut bytes = frames(1, b"hello");
        bytes.extend(frames(2, b"world!"));
        let mut reader = bytes.as_slice();
        assert_eq!(
            read_frame(&mut reader).await.unwrap(),
            Some((1, b"hello".to_vec()))
        );
        assert_eq!(
            read_frame(&mut reader).await.unwrap(),
            Some((2, b"world!".to_vec()))
        );
        assert_eq!(read_frame(&mut reader).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_by_its_length() {
        let mut bytes = 1u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        let error = read_frame(&mut bytes.as_slice()).await.unwrap_err();
        assert!(error.to_string().contains("4294967295 bytes"), "{error}");
    }
}
