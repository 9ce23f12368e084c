//! The in-pod poll-mode driver. Nothing is implemented here yet: issue 5 builds it.
//! The crate exists so the workspace has its final shape.
#![forbid(unsafe_code)]
