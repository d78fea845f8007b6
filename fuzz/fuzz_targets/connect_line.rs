#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vsock_fuzz::connect_line::run(data));
