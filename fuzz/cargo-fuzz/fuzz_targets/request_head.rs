//! libFuzzer entry point of the `request_head` target: see `meridian_fuzz::request_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meridian_fuzz::request_head(data));
