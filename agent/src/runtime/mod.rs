//! Runs the instances of `process` functions: spawn, readiness, restarts, drain, logs.
