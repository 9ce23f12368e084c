//! Admission webhook (being written).
