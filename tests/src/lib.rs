//! Cross-crate and testbed end-to-end tests live in `tests/`; this library holds their shared helpers.
#![forbid(unsafe_code)]
