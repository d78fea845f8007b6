//! `DriverThread`: the loop's thread id and its stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vsock_host::DriverThread;

#[test]
fn the_loop_thread_is_named_and_its_id_is_known() {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = DriverThread::spawn(
        "vsock-test-loop",
        move || {
            while !stopping.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(7u32)
        },
        move || stop.store(true, Ordering::Release),
    )
    .unwrap();
    let tid = thread.tid().expect("the thread's id from /proc");
    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
    assert_eq!(comm.trim(), "vsock-test-loop");
    let mapped = thread.map(|v| v * 2);
    assert_eq!(mapped.tid(), Some(tid));
    assert_eq!(mapped.stop().unwrap(), 14);
}
