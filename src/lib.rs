//! twinpage: userspace same-page merging (KSM) for QEMU guests and any
//! process that marks memory mergeable.
//!
//! The [`Engine`] merges identical pages of the process it runs in behind
//! copy-on-write: a merged page is a page of a memfd (the store) mapped
//! `MAP_PRIVATE` over the original. The merge protocol write-protects the page
//! with userfaultfd, compares it byte for byte with the store page, remaps it
//! and wakes any writer, so that no write is ever lost (see `merge`).

pub(crate) mod advisor;
pub(crate) mod anonymize;
#[doc(hidden)]
pub mod bench_api;
pub mod broker;
pub mod digest;
pub mod doctor;
pub mod engine;
pub mod envconfig;
pub(crate) mod guest;
pub mod host;
pub mod inflight;
pub mod link;
pub(crate) mod map_budget;
pub mod maplimit;
pub mod maps;
pub(crate) mod merge;
pub mod own;
pub mod pacing;
pub mod primitive;
#[doc(hidden)]
pub mod ratelimit; // for warn_once!, which the preload uses too
pub mod region;
pub(crate) mod scan;
pub(crate) mod scratch;
pub(crate) mod state;
pub(crate) mod stats;
pub mod statsfs;
pub mod store;
pub mod sys;
#[doc(hidden)]
pub mod testhook;
pub mod threads;
pub mod tree;
pub mod tunables;
pub(crate) mod unmerge;

pub use engine::{Engine, EngineError};
pub use stats::KsmStats;
pub use tunables::{AdvisorMode, MergeMode, TunableError};
