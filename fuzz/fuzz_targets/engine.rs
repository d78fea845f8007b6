#![no_main]
libfuzzer_sys::fuzz_target!(|input: vsock_fuzz::engine::Input| vsock_fuzz::engine::run(&input));
