//! The gateway with one more plugin: the stock command line
//! (`--config`, `check`), run with [`gateway_example_request_counter::registry`].

use std::process::ExitCode;

/// The gateway's allocator, as in the stock binary.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: gateway::engine::allocator::Allocator = gateway::engine::allocator::Allocator;

fn main() -> ExitCode {
    gateway::cli::main(gateway_example_request_counter::registry())
}
