//! dz-loader's integration tests, in one binary (each links the whole host; one link instead of four).

mod common;
mod config_errors;
mod engine_multi_tenant;
mod merge_mode;
mod multi_tenant;
mod seams;
mod swap_mode;
mod tensor_parallel;
mod unpatched_host;
