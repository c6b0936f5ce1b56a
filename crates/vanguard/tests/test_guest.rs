//! The built-in test guest booted through `vanguard run`: every scenario of docs/test-guest.md
//! with 1, 2 and 8 vCPUs, guest memory sizes around the 3 GiB MMIO hole, and the console and
//! timing options.

mod common;

use common::{guest, run_args, Outcome, TempDir};
use std::time::Duration;

const DONE: &str = "vanguard-guest: done, powering off";

/// The e820 lines the guest prints for RAM of `mib` MiB below the 3 GiB hole.
fn low_e820(mib: u64) -> [String; 2] {
    [
        "e820: usable 0x000000000000-0x00000009fbff".to_string(),
        format!("e820: usable 0x000000100000-0x{:012x}", (mib << 20) - 1),
    ]
}

/// Checks the `hello` banner line.
#[track_caller]
fn assert_banner(out: &Outcome, cpus: u8, mib: u64) {
    out.assert_line(&format!("Vanguard test guest: {cpus} vCPUs online of {cpus}, {mib} MiB RAM"));
}

/// The `mem: wrote and verified N MiB in R ranges (C Mcycles): ok` line: returns N.
#[track_caller]
fn mem_result(out: &Outcome, ranges: usize) -> u64 {
    let line = out.line_starting("mem: ");
    let rest = line
        .strip_prefix("mem: wrote and verified ")
        .and_then(|r| r.strip_suffix(" Mcycles): ok"))
        .unwrap_or_else(|| panic!("unexpected mem line {line:?}\n{}", out.report()));
    let (mib, rest) =
        rest.split_once(" MiB in ").unwrap_or_else(|| panic!("bad mem line {line:?}"));
    let expected = format!("{ranges} ranges (");
    assert!(rest.starts_with(&expected), "expected {ranges} ranges in {line:?}\n{}", out.report());
    mib.parse().unwrap_or_else(|_| panic!("bad MiB count in {line:?}"))
}

/// Generates one test per vCPU count for a check that takes the count.
macro_rules! for_cpu_counts {
    ($check:ident: $($test:ident = $cpus:literal),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                if !common::kvm_available() {
                    return;
                }
                $check($cpus);
            }
        )+
    };
}

// ---------------------------------------------------------------- hello, smp, mem --

fn hello_smp_mem(cpus: u8) {
    let cmdline = "console=ttyS0 hello smp mem=16M";
    let out = guest(cmdline, &["--cpus", &cpus.to_string()]).run();
    out.assert_clean_exit();
    assert_banner(&out, cpus, 127);
    let [e820_low, e820_high] = low_e820(128);
    let smp = format!("smp: {cpus} of {cpus} vCPUs did 10000000 rounds of work correctly: ok");
    out.assert_lines_in_order(&[
        &format!("Vanguard test guest: {cpus} vCPUs online of {cpus}, 127 MiB RAM"),
        &format!("cmdline: {cmdline}"),
        &e820_low,
        &e820_high,
        "hello: ok",
        &smp,
    ]);
    out.assert_line(&format!(
        "cpuid: apic id 0, {cpus} logical processors, hypervisor bit set, signature KVMKVMKVM..."
    ));
    let e820_count = out.lines().iter().filter(|l| l.starts_with("e820: ")).count();
    assert_eq!(e820_count, 2, "expected exactly two e820 lines\n{}", out.report());
    for cpu in 1..cpus {
        out.assert_line(&format!("smp: cpu {cpu} online"));
    }
    out.assert_stdout_lacks(&format!("smp: cpu {cpus} online"));
    assert_eq!(mem_result(&out, 1), 16, "mem=16M tests 16 MiB\n{}", out.report());
    assert!(out.line_index(&smp) < out.line_index(out.line_starting("mem: ")));
    out.assert_stdout_lacks("FAILED");
    assert_eq!(out.lines().last(), Some(&DONE), "the last line is the power-off\n{}", out.report());
}

for_cpu_counts!(hello_smp_mem:
    hello_smp_mem_1_cpu = 1,
    hello_smp_mem_2_cpus = 2,
    hello_smp_mem_8_cpus = 8,
);

// ---------------------------------------------------------------------- echo --

fn echo(cpus: u8) {
    // An empty line is skipped; CR LF ends a line like LF.
    let input = b"hello world\nsecond line\n\ncr lf\r\nquit\n";
    let out = guest("console=ttyS0 echo", &["--cpus", &cpus.to_string()]).stdin(input).run();
    out.assert_clean_exit();
    let expected = [
        "echo: ready",
        "echo: hello world",
        "echo: second line",
        "echo: cr lf",
        "echo: done",
        DONE,
    ];
    let got: Vec<&str> = out.lines().into_iter().filter(|l| !l.starts_with("smp: cpu ")).collect();
    assert_eq!(got, expected, "\n{}", out.report());
}

for_cpu_counts!(echo:
    echo_1_cpu = 1,
    echo_2_cpus = 2,
    echo_8_cpus = 8,
);

/// Input typed after the guest is ready reaches it while the VM runs (not only at EOF).
#[test]
fn echo_interactive() {
    if !common::kvm_available() {
        return;
    }
    let mut vm = guest("console=ttyS0 echo", &[]).spawn_interactive();
    vm.wait_for_stdout("echo: ready");
    vm.write_stdin(b"first\n");
    vm.wait_for_stdout("echo: first\r\n");
    vm.write_stdin(b"second\n");
    vm.wait_for_stdout("echo: second\r\n");
    vm.write_stdin(b"quit\n");
    vm.wait_for_stdout("echo: done");
    let out = vm.finish();
    out.assert_clean_exit();
    out.assert_lines_in_order(&["echo: ready", "echo: first", "echo: second", "echo: done", DONE]);
}

/// Far more input than the UART's receive FIFO holds arrives whole and in order: the VMM holds
/// input back rather than dropping it.
#[test]
fn echo_many_lines_are_not_dropped() {
    if !common::kvm_available() {
        return;
    }
    let lines: Vec<String> =
        (0..200).map(|i| format!("line {i:03} {}", "abcdefghij".repeat(5))).collect();
    let mut input = lines.join("\n");
    input.push_str("\nquit\n");
    let out = guest("console=ttyS0 echo", &[]).stdin(input.as_bytes()).run();
    out.assert_clean_exit();
    let echoed: Vec<&str> = out
        .lines()
        .into_iter()
        .filter_map(|l| l.strip_prefix("echo: "))
        .filter(|l| l.starts_with("line "))
        .collect();
    assert_eq!(echoed, lines, "every line echoed once, in order\n{}", out.report());
    out.assert_lines_in_order(&["echo: ready", "echo: done", DONE]);
}

// --------------------------------------------------------------- powerbutton --

/// SIGTERM presses the ACPI power button; the guest sees it and powers off.
fn powerbutton(cpus: u8) {
    let mut vm =
        guest("console=ttyS0 powerbutton", &["--cpus", &cpus.to_string()]).spawn_interactive();
    vm.wait_for_stdout("powerbutton: waiting");
    vm.signal(libc::SIGTERM);
    let out = vm.finish();
    out.assert_clean_exit();
    out.assert_lines_in_order(&["powerbutton: waiting", "powerbutton: pressed", DONE]);
}

for_cpu_counts!(powerbutton:
    powerbutton_1_cpu = 1,
    powerbutton_2_cpus = 2,
    powerbutton_8_cpus = 8,
);

/// A guest that ignores the power button: the second SIGTERM ends the VM (status 128 + 15).
#[test]
fn second_sigterm_ends_the_vm() {
    if !common::kvm_available() {
        return;
    }
    let mut vm = guest("console=ttyS0 echo", &[]).spawn_interactive();
    vm.wait_for_stdout("echo: ready");
    vm.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    vm.signal(libc::SIGTERM);
    let out = vm.finish();
    out.assert_code(128 + libc::SIGTERM);
    out.assert_stdout_lacks(DONE);
}

// ---------------------------------------------------------------------- exit --

fn exit(cpus: u8) {
    let cpus = cpus.to_string();
    for code in [42, 0] {
        let out =
            guest(&format!("console=ttyS0 exit={code} hello"), &["--debug-exit", "--cpus", &cpus])
                .run();
        out.assert_code(code);
        assert!(out.stderr.is_empty(), "nothing on stderr\n{}", out.report());
        out.assert_line(&format!("exit: requesting exit status {code}"));
        // The VM ended at the port write: nothing after it ran.
        out.assert_stdout_lacks("Vanguard test guest");
        out.assert_stdout_lacks(DONE);
    }
}

for_cpu_counts!(exit:
    exit_1_cpu = 1,
    exit_2_cpus = 2,
    exit_8_cpus = 8,
);

#[test]
fn exit_255_is_the_exit_status() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 exit=255", &["--debug-exit"]).run();
    out.assert_code(255);
    out.assert_line("exit: requesting exit status 255");
}

/// Without --debug-exit the port is absent: the guest says so and carries on.
#[test]
fn exit_without_debug_exit_device_continues() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 exit=42 hello", &[]).run();
    out.assert_clean_exit();
    out.assert_lines_in_order(&[
        "exit: requesting exit status 42",
        "exit: no debug-exit device, continuing",
        "hello: ok",
        DONE,
    ]);
}

// -------------------------------------------------------------------- reboot --

fn reboot(cpus: u8) {
    let out = guest("console=ttyS0 hello reboot hello", &["--cpus", &cpus.to_string()]).run();
    out.assert_clean_exit();
    // One banner: the reset ended the VM, nothing ran after it.
    let banners = out.lines().iter().filter(|l| l.starts_with("Vanguard test guest")).count();
    assert_eq!(banners, 1, "\n{}", out.report());
    out.assert_line("hello: ok");
    out.assert_stdout_lacks(DONE);
}

for_cpu_counts!(reboot:
    reboot_1_cpu = 1,
    reboot_2_cpus = 2,
    reboot_8_cpus = 8,
);

// --------------------------------------------------------------------- fault --

/// A guest crash: exit 1, the error line, then the vCPU's registers, indented.
#[track_caller]
fn assert_triple_fault(out: &Outcome) {
    out.assert_code(1).assert_no_panic();
    let lines = out.stderr_lines();
    assert!(
        lines.first().is_some_and(
            |l| l.starts_with("vanguard: error: ") && l.contains("vCPU 0 triple-faulted")
        ),
        "the first stderr line names the triple fault\n{}",
        out.report()
    );
    assert!(lines.len() > 2, "register lines follow\n{}", out.report());
    for line in &lines[1..] {
        assert!(line.starts_with("  "), "register lines are indented: {line:?}\n{}", out.report());
    }
    for reg in ["rip ", "rsp ", "rax ", "cr3 "] {
        out.assert_stderr_contains(reg);
    }
    // The guest crashes with ud2.
    out.assert_stderr_contains("  code at rip: 0f 0b");
    out.assert_stdout_lacks(DONE);
}

fn fault(cpus: u8) {
    let out = guest("console=ttyS0 hello fault hello", &["--cpus", &cpus.to_string()]).run();
    assert_triple_fault(&out);
    let banners = out.lines().iter().filter(|l| l.starts_with("Vanguard test guest")).count();
    assert_eq!(banners, 1, "nothing runs after the fault\n{}", out.report());
}

for_cpu_counts!(fault:
    fault_1_cpu = 1,
    fault_2_cpus = 2,
    fault_8_cpus = 8,
);

/// A scenario that fails makes the guest report it and crash, so the VMM exits 1.
#[test]
fn failed_scenario_crashes_the_guest() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 smp=lots hello", &[]).run();
    assert_triple_fault(&out);
    out.assert_lines_in_order(&[
        "vanguard-guest: cannot parse 'smp=lots'",
        "hello: ok",
        "vanguard-guest: 1 scenario(s) FAILED",
    ]);
}

/// `memcheck` reads back what `mem` wrote, less what `dirty` took over since; with no `mem`
/// before it, it fails saying so.
#[test]
fn memcheck_reads_back_what_mem_wrote() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 mem=16M memcheck", &[]).run();
    out.assert_clean_exit();
    out.assert_line(
        "memcheck: verified 16 MiB in 1 ranges (skipped 0 KiB another scenario wrote): ok",
    );
    let out = guest("console=ttyS0 memcheck hello", &[]).run();
    assert_triple_fault(&out);
    out.assert_lines_in_order(&[
        "memcheck: FAILED: no mem scenario ran before",
        "hello: ok",
        "vanguard-guest: 1 scenario(s) FAILED",
    ]);
}

// -------------------------------------------------------------- memory sizes --

fn hello_mem_full(memory: &str, mib: u64) {
    let out = guest("console=ttyS0 hello mem", &["--memory", memory]).run();
    out.assert_clean_exit();
    assert_banner(&out, 1, mib - 1);
    let [low, high] = low_e820(mib);
    out.assert_lines_in_order(&[&low, &high, "hello: ok"]);
    // All RAM above the guest's image and per-vCPU areas (a few MiB) is tested.
    let tested = mem_result(&out, 1);
    assert!(
        tested <= mib && tested + 8 >= mib,
        "mem tested {tested} MiB of {mib}\n{}",
        out.report()
    );
    assert_eq!(out.lines().last(), Some(&DONE), "\n{}", out.report());
}

/// The smallest guest Vanguard accepts.
#[test]
fn memory_16m_minimum_full_test() {
    if !common::kvm_available() {
        return;
    }
    hello_mem_full("16M", 16);
}

/// A 64 GiB guest: 3 GiB below the hole, 61 GiB above 4 GiB (mapped, but touched only where
/// the guest writes: here its first 64 MiB of free RAM).
#[test]
fn memory_64g_layout() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 hello mem=64M", &["--memory", "64G", "--cpus", "2"]).run();
    out.assert_clean_exit();
    assert_banner(&out, 2, (64 << 10) - 1);
    out.assert_lines_in_order(&[
        "e820: usable 0x000000000000-0x00000009fbff",
        "e820: usable 0x000000100000-0x0000bfffffff",
        "e820: usable 0x000100000000-0x00103fffffff",
        "hello: ok",
    ]);
    assert_eq!(mem_result(&out, 1), 64);
    out.assert_line(DONE);
}

#[test]
fn memory_32m_full_test() {
    if !common::kvm_available() {
        return;
    }
    hello_mem_full("32M", 32);
}

#[test]
fn memory_128m_full_test() {
    if !common::kvm_available() {
        return;
    }
    hello_mem_full("128M", 128);
}

#[test]
fn memory_1g_layout() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 hello", &["--memory", "1G"]).run();
    out.assert_clean_exit();
    assert_banner(&out, 1, 1023);
    let e820: Vec<&str> = out.lines().into_iter().filter(|l| l.starts_with("e820: ")).collect();
    assert_eq!(
        e820,
        [
            "e820: usable 0x000000000000-0x00000009fbff",
            "e820: usable 0x000000100000-0x00003fffffff"
        ],
        "\n{}",
        out.report()
    );
}

const E820_4G: [&str; 3] = [
    "e820: usable 0x000000000000-0x00000009fbff",
    "e820: usable 0x000000100000-0x0000bfffffff",
    "e820: usable 0x000100000000-0x00013fffffff",
];

/// Memory above 3 GiB moves above 4 GiB, past the MMIO hole.
#[test]
fn memory_4g_layout() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 hello", &["--memory", "4G"]).run();
    out.assert_clean_exit();
    assert_banner(&out, 1, 4095);
    let e820: Vec<&str> = out.lines().into_iter().filter(|l| l.starts_with("e820: ")).collect();
    assert_eq!(e820, E820_4G, "\n{}", out.report());
}

/// All 4 GiB written and read back, on both sides of the hole (about 6 s on a PVM host).
#[test]
fn memory_4g_full_test_2_cpus() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 hello mem", &["--memory", "4G", "--cpus", "2"])
        .timeout(Duration::from_secs(120))
        .run();
    out.assert_clean_exit();
    assert_banner(&out, 2, 4095);
    out.assert_lines_in_order(&[E820_4G[0], E820_4G[1], E820_4G[2], "hello: ok"]);
    let tested = mem_result(&out, 2);
    assert!((4080..=4096).contains(&tested), "mem tested {tested} MiB of 4096\n{}", out.report());
}

/// Exactly 3 GiB fits below the hole; one MiB more starts the range above 4 GiB.
#[test]
fn memory_hole_boundaries() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 hello", &["--memory", "3G"]).run();
    out.assert_clean_exit();
    assert_banner(&out, 1, 3071);
    let e820: Vec<&str> = out.lines().into_iter().filter(|l| l.starts_with("e820: ")).collect();
    assert_eq!(e820, E820_4G[..2], "\n{}", out.report());

    let out = guest("console=ttyS0 hello", &["--memory", "3073M"]).run();
    out.assert_clean_exit();
    assert_banner(&out, 1, 3072);
    let e820: Vec<&str> = out.lines().into_iter().filter(|l| l.starts_with("e820: ")).collect();
    assert_eq!(
        e820,
        [E820_4G[0], E820_4G[1], "e820: usable 0x000100000000-0x0001000fffff"],
        "\n{}",
        out.report()
    );
}

// ------------------------------------------------------------ console, timer --

#[test]
fn default_run() {
    if !common::kvm_available() {
        return;
    }
    let out = run_args::<_, &str>([]).run();
    out.assert_clean_exit();
    assert_banner(&out, 1, 127);
    out.assert_lines_in_order(&[
        "Vanguard test guest: 1 vCPUs online of 1, 127 MiB RAM",
        "cmdline: console=ttyS0 hello smp mem=8M",
        "hello: ok",
        "smp: 1 of 1 vCPUs did 10000000 rounds of work correctly: ok",
    ]);
    assert_eq!(mem_result(&out, 1), 8);
    assert_eq!(out.lines().last(), Some(&DONE), "\n{}", out.report());
}

#[test]
fn serial_to_file() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("serial");
    // An existing file is replaced, not appended to.
    let path = dir.file("console.log", b"stale contents\n");
    let out = run_args(["--serial".to_string(), format!("file:{}", path.display())]).run();
    out.assert_clean_exit();
    assert!(out.stdout.is_empty(), "the console went to the file, not stdout\n{}", out.report());
    let console = std::fs::read_to_string(&path).expect("read the console file");
    let lines: Vec<&str> = console.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"Vanguard test guest: 1 vCPUs online of 1, 127 MiB RAM"),
        "{console}"
    );
    assert_eq!(lines.last(), Some(&DONE), "{console}");
    assert!(lines.contains(&"hello: ok"), "{console}");
    assert!(!console.contains("stale"), "the file was truncated first: {console}");
}

#[test]
fn serial_none() {
    if !common::kvm_available() {
        return;
    }
    let out = run_args(["--serial", "none"]).run();
    out.assert_clean_exit();
    assert!(out.stdout.is_empty(), "--serial none prints nothing\n{}", out.report());
}

#[test]
fn boot_timer() {
    if !common::kvm_available() {
        return;
    }
    let out = run_args(["--boot-timer"]).run();
    out.assert_code(0);
    out.assert_line(DONE);
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one boot-timer line on stderr\n{}", out.report());
    let ms: f64 = lines[0]
        .strip_prefix("vanguard: boot timer: guest reached its payload ")
        .and_then(|r| r.split_once(" ms after start"))
        .and_then(|(ms, _)| ms.parse().ok())
        .unwrap_or_else(|| panic!("unexpected boot-timer line {:?}\n{}", lines[0], out.report()));
    assert!(ms > 0.0 && ms < 10_000.0, "boot took {ms} ms?\n{}", out.report());
    // Without --boot-timer, stderr stays empty (checked by default_run's clean exit).
}

// ---------------------------------------------------------------------- hugepages --

/// Guest memory from hugetlbfs: reserves 2 MiB pages for a 64 MiB guest (root only; the
/// previous reservation is restored), then runs the memory test over all of it.
#[test]
fn hugepages_back_guest_memory() {
    if !common::kvm_available() {
        return;
    }
    const KNOB: &str = "/proc/sys/vm/nr_hugepages";
    let Ok(before) = std::fs::read_to_string(KNOB) else {
        println!("skipping: cannot read {KNOB}");
        return;
    };
    let before: u64 = before.trim().parse().unwrap_or(0);
    // 64 MiB of guest memory is 32 pages of 2 MiB.
    if std::fs::write(KNOB, (before + 32).to_string()).is_err() {
        println!("skipping: cannot reserve huge pages through {KNOB} (needs root)");
        return;
    }
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    let out = if free >= 32 {
        Some(guest("console=ttyS0 hello mem", &["--hugepages", "--memory", "64M"]).run())
    } else {
        None
    };
    let _ = std::fs::write(KNOB, before.to_string());
    let Some(out) = out else {
        println!("skipping: the kernel reserved only {free} of 32 huge pages (fragmented memory)");
        return;
    };
    out.assert_clean_exit();
    assert_banner(&out, 1, 63);
    assert!(mem_result(&out, 1) > 0);
    out.assert_line(DONE);
}
