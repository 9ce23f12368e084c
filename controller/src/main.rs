//! `vfplane-controller` (being written).
fn main() {}
