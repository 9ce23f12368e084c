//! The plugin QEMU loads: counts guest instructions per vCPU, and writes a
//! JSON line at each span's end.
//!
//! Counting: every translated block gets an inline add of its instruction
//! count to its vCPU's counter, done by QEMU's generated code at block
//! entry (a block left early by an exception still counts whole: a few
//! instructions per interrupt). Markers are found at translation time by
//! their bytes and get a callback. The ABI is QEMU's plugin API, version
//! 3 and later (`qemu-plugin.h`): the few calls below, as QEMU 10.0
//! exports them.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::fs::File;
use std::io::Write as _;
use std::sync::{Mutex, OnceLock};

use crate::marker::{MARKER_LEN, Mark};

type PluginId = u64;

/// `struct qemu_plugin_tb`, `struct qemu_plugin_insn`,
/// `struct qemu_plugin_scoreboard`: opaque.
#[repr(C)]
struct Opaque {
    _private: [u8; 0],
}

/// `qemu_plugin_u64`: a u64 at `offset` in each vCPU's scoreboard entry.
#[repr(C)]
#[derive(Clone, Copy)]
struct ScoreU64 {
    score: *mut Opaque,
    offset: usize,
}

/// `QEMU_PLUGIN_INLINE_ADD_U64`.
const INLINE_ADD_U64: c_int = 0;
/// `QEMU_PLUGIN_CB_NO_REGS`.
const CB_NO_REGS: c_int = 0;

unsafe extern "C" {
    fn qemu_plugin_register_vcpu_tb_trans_cb(id: PluginId, cb: extern "C" fn(id: PluginId, tb: *mut Opaque));
    fn qemu_plugin_tb_n_insns(tb: *const Opaque) -> usize;
    fn qemu_plugin_tb_get_insn(tb: *const Opaque, idx: usize) -> *mut Opaque;
    fn qemu_plugin_insn_size(insn: *const Opaque) -> usize;
    fn qemu_plugin_insn_data(insn: *const Opaque, dest: *mut c_void, len: usize) -> usize;
    fn qemu_plugin_register_vcpu_insn_exec_cb(
        insn: *mut Opaque,
        cb: extern "C" fn(vcpu_index: c_uint, userdata: *mut c_void),
        flags: c_int,
        userdata: *mut c_void,
    );
    fn qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(
        tb: *mut Opaque,
        op: c_int,
        entry: ScoreU64,
        imm: u64,
    );
    fn qemu_plugin_scoreboard_new(element_size: usize) -> *mut Opaque;
    fn qemu_plugin_u64_get(entry: ScoreU64, vcpu_index: c_uint) -> u64;
    fn qemu_plugin_u64_sum(entry: ScoreU64) -> u64;
}

/// The API version this plugin was written against: `qemu_plugin_insn_data`
/// copies into a buffer from version 3 on.
#[unsafe(no_mangle)]
#[used]
pub static qemu_plugin_version: c_int = 3;

struct Plugin {
    /// Instructions executed, one u64 per vCPU.
    insns: ScoreU64,
    spans: Mutex<Spans>,
}

// SAFETY: `insns` points to a scoreboard QEMU made for this plugin and
// never frees while it is loaded; QEMU's scoreboard calls may be made from
// any vCPU thread (the per-vCPU entries are QEMU's to synchronise). The
// rest is behind a Mutex.
unsafe impl Send for Plugin {}
// SAFETY: as for Send.
unsafe impl Sync for Plugin {}

#[derive(Debug)]
struct Spans {
    out: File,
    span_start: Option<u64>,
    /// The span as of its last point: (instructions so far, kept, bursts,
    /// dropped).
    span_point: Option<(u64, u64, u64, u64)>,
    burst_start: Vec<Option<u64>>,
    kept: u64,
    bursts: u64,
    dropped: u64,
}

static PLUGIN: OnceLock<Plugin> = OnceLock::new();

impl Plugin {
    fn sum(&self) -> u64 {
        // SAFETY: `insns` is the live scoreboard entry made at install.
        unsafe { qemu_plugin_u64_sum(self.insns) }
    }

    fn of_vcpu(&self, vcpu: c_uint) -> u64 {
        // SAFETY: as in `sum`; `vcpu` is the index QEMU passed to a callback.
        unsafe { qemu_plugin_u64_get(self.insns, vcpu) }
    }

    fn on_mark(&self, vcpu: c_uint, mark: Mark) {
        let mut spans = self
            .spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = vcpu as usize;
        match mark {
            Mark::SpanBegin => {
                spans.span_start = Some(self.sum());
                spans.span_point = None;
                spans.kept = 0;
                spans.bursts = 0;
                spans.dropped = 0;
            }
            Mark::SpanPoint => {
                spans.span_point = Some((self.sum(), spans.kept, spans.bursts, spans.dropped));
            }
            Mark::SpanEnd => {
                // Up to the last point: bursts after it are not the span's.
                let (end, kept, bursts, dropped) =
                    spans
                        .span_point
                        .take()
                        .unwrap_or((self.sum(), spans.kept, spans.bursts, spans.dropped));
                let line = match spans.span_start.take() {
                    Some(start) => serde_json::json!({
                        "span_instructions": end.wrapping_sub(start),
                        "burst_instructions": kept,
                        "bursts": bursts,
                        "dropped_instructions": dropped,
                    }),
                    None => serde_json::json!({"error": "a span ended that never began"}),
                };
                // A failed write shows as a missing line to the reader.
                let _ = writeln!(spans.out, "{line}").and_then(|()| spans.out.flush());
            }
            Mark::BurstBegin | Mark::BurstKeep | Mark::BurstDrop => {
                if spans.burst_start.len() <= slot {
                    spans.burst_start.resize(slot + 1, None);
                }
                let now = self.of_vcpu(vcpu);
                let open = &mut spans.burst_start[slot];
                match mark {
                    // A burst already open (a drop opened it) goes on.
                    Mark::BurstBegin => {
                        open.get_or_insert(now);
                    }
                    Mark::BurstKeep => {
                        if let Some(start) = open.take() {
                            spans.kept += now.wrapping_sub(start);
                            spans.bursts += 1;
                        }
                    }
                    _ => {
                        if let Some(start) = open.replace(now) {
                            spans.dropped += now.wrapping_sub(start);
                        }
                    }
                }
            }
        }
    }
}

extern "C" fn on_mark(vcpu_index: c_uint, userdata: *mut c_void) {
    let Some(plugin) = PLUGIN.get() else { return };
    // The marker's kind, as registered in `on_translate`.
    if let Some(mark) = u8::try_from(userdata as usize).ok().and_then(Mark::from_kind) {
        plugin.on_mark(vcpu_index, mark);
    }
}

extern "C" fn on_translate(_id: PluginId, tb: *mut Opaque) {
    let Some(plugin) = PLUGIN.get() else { return };
    // SAFETY: `tb` is the block QEMU is translating, valid for this
    // callback; the instruction handles are used within it too.
    unsafe {
        let n = qemu_plugin_tb_n_insns(tb);
        qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(tb, INLINE_ADD_U64, plugin.insns, n as u64);
        for i in 0..n {
            let insn = qemu_plugin_tb_get_insn(tb, i);
            if insn.is_null() || qemu_plugin_insn_size(insn) != MARKER_LEN {
                continue;
            }
            let mut bytes = [0u8; MARKER_LEN];
            if qemu_plugin_insn_data(insn, bytes.as_mut_ptr().cast(), MARKER_LEN) != MARKER_LEN {
                continue;
            }
            if let Some(mark) = Mark::decode(&bytes) {
                qemu_plugin_register_vcpu_insn_exec_cb(
                    insn,
                    on_mark,
                    CB_NO_REGS,
                    mark as usize as *mut c_void,
                );
            }
        }
    }
}

/// QEMU's entry point: `out=FILE` names where the spans go.
///
/// # Safety
/// Called by QEMU once, with `argv` holding `argc` C strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qemu_plugin_install(
    id: PluginId,
    _info: *const c_void,
    argc: c_int,
    argv: *const *const c_char,
) -> c_int {
    let mut out = None;
    for i in 0..usize::try_from(argc).unwrap_or(0) {
        // SAFETY: QEMU passes `argc` valid C strings in `argv`.
        let arg = unsafe { CStr::from_ptr(*argv.add(i)) }.to_string_lossy();
        if let Some(path) = arg.strip_prefix("out=") {
            out = Some(path.to_owned());
        }
    }
    let Some(path) = out else {
        eprintln!("vfplane-guest-insns: give the output file as out=FILE");
        return 1;
    };
    let file = match File::create(&path) {
        Ok(file) => file,
        Err(error) => {
            eprintln!("vfplane-guest-insns: creating {path}: {error}");
            return 1;
        }
    };
    // SAFETY: plain QEMU API call at install time; one u64 per vCPU.
    let score = unsafe { qemu_plugin_scoreboard_new(std::mem::size_of::<u64>()) };
    if score.is_null() {
        eprintln!("vfplane-guest-insns: QEMU gave no scoreboard");
        return 1;
    }
    let plugin = Plugin {
        insns: ScoreU64 { score, offset: 0 },
        spans: Mutex::new(Spans {
            out: file,
            span_start: None,
            span_point: None,
            burst_start: Vec::new(),
            kept: 0,
            bursts: 0,
            dropped: 0,
        }),
    };
    if PLUGIN.set(plugin).is_err() {
        eprintln!("vfplane-guest-insns: loaded twice");
        return 1;
    }
    // SAFETY: registers a callback with the id QEMU gave us.
    unsafe { qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate) };
    0
}
