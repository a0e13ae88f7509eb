//! libFuzzer entry point of the `sidecar_table` target: see `meridian_fuzz::sidecar_table`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meridian_fuzz::sidecar_table(data));
