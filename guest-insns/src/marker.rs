//! The markers: `nopl 0x56464cNN(%rax)` (`0f 1f 80 NN 4c 46 56`), a NOP
//! whose displacement carries "VFL" and the marker's kind `NN`. It neither
//! reads nor writes memory; without the plugin it does nothing at all.

/// What a marker asks the plugin to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mark {
    /// Starts a span: from here, every instruction of every vCPU counts.
    SpanBegin = 1,
    /// Ends the span: the plugin writes its count (up to its last
    /// [`Mark::SpanPoint`], if any), with the bursts kept in it.
    SpanEnd = 2,
    /// Starts a burst on this vCPU, unless one is open: from here, its own
    /// instructions count.
    BurstBegin = 3,
    /// Ends the burst and adds its count to the span's kept bursts (a
    /// receive burst that returned frames, say).
    BurstKeep = 4,
    /// Ends the burst, adds its count to the span's dropped bursts (an
    /// empty poll, say: the span's count less the dropped is what the
    /// frames cost) and opens the next at once, so a loop of empty polls
    /// is dropped whole, the instructions between two of them included.
    BurstDrop = 5,
    /// The span's count runs to here unless a later point comes: a
    /// receiver marks each frame, so a wait after the last one (an idle
    /// timeout) is left out.
    SpanPoint = 6,
}

/// Bytes of a marker instruction.
pub const MARKER_LEN: usize = 7;

const PREFIX: [u8; 3] = [0x0f, 0x1f, 0x80];
const TAG: [u8; 3] = [0x4c, 0x46, 0x56];

impl Mark {
    const ALL: [Mark; 6] = [
        Mark::SpanBegin,
        Mark::SpanEnd,
        Mark::BurstBegin,
        Mark::BurstKeep,
        Mark::BurstDrop,
        Mark::SpanPoint,
    ];

    /// The marker's instruction bytes.
    #[must_use]
    pub fn encoding(self) -> [u8; MARKER_LEN] {
        let [a, b, c] = PREFIX;
        let [x, y, z] = TAG;
        [a, b, c, self as u8, x, y, z]
    }

    /// The marker an instruction is, if it is one.
    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Mark> {
        if bytes.len() != MARKER_LEN || bytes[..3] != PREFIX || bytes[4..] != TAG {
            return None;
        }
        Mark::from_kind(bytes[3])
    }

    /// The marker of kind `kind` (its byte in the encoding).
    #[must_use]
    pub fn from_kind(kind: u8) -> Option<Mark> {
        Mark::ALL.into_iter().find(|m| *m as u8 == kind)
    }
}

/// Executes marker `m`. Not inlined, so the plugin sees one copy of each
/// (and a span's count includes the call: a few instructions per marker).
#[inline(never)]
pub fn mark(m: Mark) {
    match m {
        Mark::SpanBegin => marker_nop::<{ Mark::SpanBegin as u8 }>(),
        Mark::SpanEnd => marker_nop::<{ Mark::SpanEnd as u8 }>(),
        Mark::BurstBegin => marker_nop::<{ Mark::BurstBegin as u8 }>(),
        Mark::BurstKeep => marker_nop::<{ Mark::BurstKeep as u8 }>(),
        Mark::BurstDrop => marker_nop::<{ Mark::BurstDrop as u8 }>(),
        Mark::SpanPoint => marker_nop::<{ Mark::SpanPoint as u8 }>(),
    }
}

/// The marker instruction of kind `KIND`: [`PREFIX`], `KIND`, [`TAG`].
#[inline(always)]
fn marker_nop<const KIND: u8>() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a NOP with a memory operand that is never accessed
    // (`nopl disp32(%rax)`): no register, flag, stack or memory changes.
    // Not `nomem`, so the compiler keeps memory accesses on their side of it.
    unsafe {
        core::arch::asm!(
            ".byte {p0},{p1},{p2},{kind},{t0},{t1},{t2}",
            p0 = const PREFIX[0],
            p1 = const PREFIX[1],
            p2 = const PREFIX[2],
            kind = const KIND,
            t0 = const TAG[0],
            t1 = const TAG[1],
            t2 = const TAG[2],
            options(nostack, preserves_flags),
        );
    }
}

/// Instructions [`spin`] executes per iteration (`dec`, `jnz`).
pub const SPIN_INSTRUCTIONS: u64 = 2;

/// Executes [`SPIN_INSTRUCTIONS`] × `iterations` instructions and no more
/// (none for 0): a known count for checking the plugin's.
#[inline(never)]
pub fn spin(iterations: u64) {
    if iterations == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a register countdown: changes only the scratch register it
    // is given and the flags (not `preserves_flags`), touches no memory.
    unsafe {
        core::arch::asm!(
            "2:",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations => _,
            options(nomem, nostack),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::hint::black_box(iterations);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_marker_decodes_to_itself_and_nothing_else_decodes() {
        for m in Mark::ALL {
            assert_eq!(Mark::decode(&m.encoding()), Some(m));
        }
        let mut other = Mark::SpanBegin.encoding();
        other[3] = 0;
        assert_eq!(Mark::decode(&other), None);
        other[3] = 7;
        assert_eq!(Mark::decode(&other), None);
        let mut untagged = Mark::SpanEnd.encoding();
        untagged[6] = 0;
        assert_eq!(Mark::decode(&untagged), None);
        assert_eq!(Mark::decode(&Mark::SpanEnd.encoding()[..6]), None);
        // A plain `nopl 0x0(%rax)` is no marker.
        assert_eq!(Mark::decode(&[0x0f, 0x1f, 0x80, 0, 0, 0, 0]), None);
    }

    #[test]
    fn spin_returns_for_any_count() {
        for n in [0, 1, 2, 1000] {
            spin(n);
        }
        assert_eq!(SPIN_INSTRUCTIONS, 2);
    }

    #[test]
    fn markers_run_as_nops_outside_qemu() {
        // A marker that were not a NOP on this CPU would kill the test (SIGILL).
        let before = std::hint::black_box(41_u64);
        for m in Mark::ALL {
            mark(m);
        }
        assert_eq!(std::hint::black_box(before) + 1, 42);
    }
}
