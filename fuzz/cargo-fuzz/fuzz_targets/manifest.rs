//! libFuzzer entry point of the `manifest` target: see `meridian_fuzz::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meridian_fuzz::manifest(data));
