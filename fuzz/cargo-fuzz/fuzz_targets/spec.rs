//! libFuzzer entry point of the `spec` target: see `meridian_fuzz::spec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meridian_fuzz::spec(data));
