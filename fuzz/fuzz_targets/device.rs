#![no_main]
libfuzzer_sys::fuzz_target!(|input: vsock_fuzz::device::Input| vsock_fuzz::device::run(&input));
