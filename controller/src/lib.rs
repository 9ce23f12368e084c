//! The cluster controller. Nothing is implemented here yet: issue 6 builds it.
//! The crate exists so the workspace has its final shape.
#![forbid(unsafe_code)]
