//! libFuzzer entry point of the `agent_table` target: see `meridian_fuzz::agent_table`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meridian_fuzz::agent_table(data));
