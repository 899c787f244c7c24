//! placeholder, replaced by the kernel-compat work
