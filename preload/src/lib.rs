//! The preload agent (issue 3): interposers only.
