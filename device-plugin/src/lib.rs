//! The kubelet device plugin. Nothing is implemented here yet: issue 4 builds it.
//! The crate exists so the workspace has its final shape.
#![forbid(unsafe_code)]
