//! Configuration from the environment, checked once when the library loads
//! (the parser is the engine crate's, shared with `twinpaged`). An invalid
//! value is reported naming the variable, and twinpage disables itself: the
//! program runs exactly as without it.

pub use twinpage::envconfig::{from_env, Config};
