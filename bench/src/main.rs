//! `vsock-bench`: the in-process benchmarks. `vsock-bench help` lists the parts.

use vsock_bench::parts::{engine, PARTS};
use vsock_bench::{fmt_value, Opts, TARGETS};

#[global_allocator]
static ALLOC: vsock_bench::alloc::Counting = vsock_bench::alloc::Counting;

fn usage() -> String {
    let mut s = String::from(
        "usage: vsock-bench PART [--quick] [--reps N] [--runtime mio,tokio,smol] [--rate PKTS_PER_S] [--mib N]\n\
         \x20      [--placement split|one|free] [--kick queue|loop] [--buffer-kib N]\n\
         \x20      vsock-bench targets        (every target: name part goal)\n\
         \x20      vsock-bench engine-count CASE N   (what callgrind runs)\n\nparts:\n",
    );
    for (name, what, _) in PARTS {
        s.push_str(&format!("  {name:<8} {what}\n"));
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(part) = args.first() else {
        eprint!("{}", usage());
        std::process::exit(2);
    };
    match part.as_str() {
        "targets" => {
            for (name, part, goal) in TARGETS {
                println!("{name} {part} {} {}", goal.sign(), fmt_value(goal.value()));
            }
        }
        "engine-count" => {
            let case = args.get(1).and_then(|c| engine::Case::parse(c));
            let n = args.get(2).and_then(|n| n.parse().ok());
            let (Some(case), Some(n)) = (case, n) else {
                eprint!("{}", usage());
                std::process::exit(2);
            };
            engine::count_only(case, n);
        }
        "help" | "--help" | "-h" => print!("{}", usage()),
        name => {
            let Some((_, _, run)) = PARTS.iter().find(|p| p.0 == name) else {
                eprint!("unknown part {name}\n{}", usage());
                std::process::exit(2);
            };
            let opts = match Opts::parse(&args[1..]) {
                Ok(o) => o,
                Err(e) => {
                    eprint!("{e}\n{}", usage());
                    std::process::exit(2);
                }
            };
            vsock_bench::sys::raise_fd_limit();
            opts.placement.set();
            vsock_bench::rig::set_kick(opts.kick);
            vsock_bench::rig::set_buffer_size(opts.buffer);
            run(&opts);
        }
    }
}
