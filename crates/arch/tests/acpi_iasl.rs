//! Checks the generated ACPI tables with ACPICA's `iasl` (Debian package `acpica-tools`), the
//! same parser Linux uses, rather than only with our own reading of the spec.
//!
//! Each table is disassembled with `iasl -d`; the run must be free of warnings and errors and the
//! disassembly must show the fields a guest depends on. The disassembly is then compiled back:
//! for the fixed-layout tables that must reproduce our bytes exactly (apart from the checksum and
//! the compiler ID that iasl stamps in), which proves every field decodes as intended. `iasl`
//! cannot disassemble a bare RSDP (it has no standard table header), so the RSDP is instead
//! compiled from a source built from our bytes, letting iasl compute both checksums itself.
//!
//! Without `iasl` the tests are skipped, unless `VANGUARD_REQUIRE_TOOLS=1` makes that a failure.

use arch::acpi::{build_tables, AcpiConfig, AcpiTable, AcpiTables};
use arch::layout::ACPI_START;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CPU_COUNTS: [u8; 3] = [1, 8, 254];

/// Whether `iasl` can run here; without it, fails or skips as `VANGUARD_REQUIRE_TOOLS` says.
fn have_iasl() -> bool {
    match Command::new("iasl").arg("-v").output() {
        Ok(out) if out.status.success() => true,
        result => {
            let why = match result {
                Ok(out) => format!("`iasl -v` failed: {}", out.status),
                Err(e) => format!("cannot run iasl: {e}"),
            };
            if std::env::var("VANGUARD_REQUIRE_TOOLS").as_deref() == Ok("1") {
                panic!(
                    "{why}; VANGUARD_REQUIRE_TOOLS=1 requires it \
                     (install Debian's acpica-tools package)"
                );
            }
            eprintln!(
                "skipping the iasl ACPI checks: {why} (install acpica-tools, or set \
                 VANGUARD_REQUIRE_TOOLS=1 to make this a failure)"
            );
            false
        }
    }
}

/// A scratch directory, removed afterwards unless the test failed (to allow inspecting it).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vanguard-acpi-iasl-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs iasl in `dir` and returns its combined stdout and stderr, which must show success.
fn iasl(dir: &Path, args: &[&str]) -> String {
    let Output { status, stdout, stderr } =
        Command::new("iasl").args(args).current_dir(dir).output().expect("run iasl");
    let log = format!("{}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    assert!(status.success(), "iasl {args:?} in {} failed ({status}):\n{log}", dir.display());
    // Clean runs say "0 Errors, 0 Warnings" when compiling and mention neither when
    // disassembling; anything else (a bad checksum, a truncated table, a name with invalid
    // characters, an unresolved method) shows up as a warning or error line.
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            (l.contains("warning") || l.contains("error") || l.contains("invalid"))
                && !l.contains("0 errors, 0 warnings")
        })
        .collect();
    assert!(problems.is_empty(), "iasl {args:?} in {} reported problems:\n{log}", dir.display());
    log
}

/// The text with every run of whitespace collapsed to one space, so checks need not copy
/// iasl's column alignment.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn table<'a>(tables: &'a AcpiTables, name: &str) -> &'a AcpiTable {
    tables.get(name).unwrap_or_else(|| panic!("no {name} table"))
}

/// Disassembles one table and returns its squashed disassembly.
fn disassemble(dir: &Path, t: &AcpiTable) -> String {
    let dat = format!("{}.dat", t.name);
    std::fs::write(dir.join(&dat), &t.bytes).unwrap();
    let log = iasl(dir, &["-d", &dat]);
    let dsl = std::fs::read_to_string(dir.join(format!("{}.dsl", t.name)))
        .unwrap_or_else(|e| panic!("no disassembly of {}: {e}\n{log}", t.name));
    assert!(
        !dsl.contains("Incorrect checksum") && !dsl.contains("****"),
        "iasl flagged {}:\n{dsl}",
        t.name
    );
    squash(&dsl)
}

fn assert_mentions(name: &str, dsl: &str, expected: &[&str]) {
    for e in expected {
        assert!(dsl.contains(e), "{name} disassembly lacks {e:?}; it is:\n{dsl}");
    }
}

/// Compiles `<name>.dsl` in `dir` back to AML and returns the bytes.
fn compile(dir: &Path, name: &str) -> Vec<u8> {
    let log = iasl(dir, &[&format!("{name}.dsl")]);
    assert!(log.contains("0 Errors, 0 Warnings"), "compiling {name}.dsl:\n{log}");
    std::fs::read(dir.join(format!("{name}.aml"))).unwrap()
}

/// Checks that iasl, recompiling its own disassembly, reproduces our table: every field
/// round-trips except the checksum and the compiler ID and revision, which iasl rewrites.
fn assert_round_trips(dir: &Path, t: &AcpiTable, has_header: bool) {
    let ours = &t.bytes;
    let theirs = compile(dir, t.name);
    assert_eq!(theirs.len(), ours.len(), "{} recompiled length", t.name);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let rewritten = has_header && (i == 9 || (28..36).contains(&i));
        assert!(rewritten || a == b, "{} byte {i:#x}: ours {a:#04x}, recompiled {b:#04x}", t.name);
    }
}

#[test]
fn iasl_disassembles_every_table() {
    if !have_iasl() {
        return;
    }
    for n in CPU_COUNTS {
        let dir = ScratchDir::new(&format!("cpus{n}"));
        let dir = dir.0.as_path();
        let tables = build_tables(&AcpiConfig::new(n), ACPI_START).unwrap();
        let addr = |name| table(&tables, name).addr.0;

        let facp = disassemble(dir, table(&tables, "FACP"));
        assert_mentions(
            "FACP",
            &facp,
            &[
                "Oem ID : \"VANGRD\"",
                "Oem Table ID : \"VANGUARD\"",
                "Revision : 06",
                "FADT Minor Revision : 05",
                "FACS Address : 00000000 [",
                &format!("FACS Address : {:016X}", addr("FACS")),
                &format!("DSDT Address : {:08X}", addr("DSDT")),
                &format!("DSDT Address : {:016X}", addr("DSDT")),
                "SCI Interrupt : 0009",
                "SMI Command Port : 00000000",
                "PM1A Event Block Address : 00000600",
                "PM1A Control Block Address : 00000604",
                "PM Timer Block Address : 00000000",
                "PM1 Event Block Length : 04",
                "PM1 Control Block Length : 02",
                "8042 Present on ports 60/64 (V2) : 1",
                "VGA Not Present (V4) : 1",
                "MSI Not Supported (V4) : 0",
                "WBINVD instruction is operational (V1) : 1",
                "All CPUs support C1 (V1) : 1",
                "Control Method Power Button (V1) : 0",
                "Control Method Sleep Button (V1) : 1",
                "Reset Register Supported (V2) : 1",
                "Hardware Reduced (V5) : 0",
                "Reset Register : [Generic Address Structure] \
                 [074h 0116 1] Space ID : 01 [SystemIO] \
                 [075h 0117 1] Bit Width : 08 \
                 [076h 0118 1] Bit Offset : 00 \
                 [077h 0119 1] Encoded Access Width : 01 [Byte Access:8] \
                 [078h 0120 8] Address : 0000000000000064",
                "Value to cause reset : FE",
                "PM1A Event Block : [Generic Address Structure] \
                 [094h 0148 1] Space ID : 01 [SystemIO] \
                 [095h 0149 1] Bit Width : 20",
                "Address : 0000000000000600",
                "PM1A Control Block : [Generic Address Structure] \
                 [0ACh 0172 1] Space ID : 01 [SystemIO] \
                 [0ADh 0173 1] Bit Width : 10",
                "Address : 0000000000000604",
            ],
        );
        assert_round_trips(dir, table(&tables, "FACP"), true);

        let apic = disassemble(dir, table(&tables, "APIC"));
        assert_eq!(
            apic.matches("[Processor Local APIC]").count(),
            usize::from(n),
            "MADT processor count:\n{apic}"
        );
        assert_eq!(apic.matches("Processor Enabled : 1").count(), usize::from(n));
        assert_eq!(apic.matches("[I/O APIC]").count(), 1);
        assert_eq!(apic.matches("[Interrupt Source Override]").count(), 2);
        assert_eq!(apic.matches("[Local APIC NMI]").count(), 1);
        let last = n - 1;
        assert_mentions(
            "APIC",
            &apic,
            &[
                "Local Apic Address : FEE00000",
                "PC-AT Compatibility : 1",
                &format!("Processor ID : {last:02X}"),
                &format!("Local Apic ID : {last:02X}"),
                &format!("I/O Apic ID : {n:02X}"),
                "Address : FEC00000",
                "Source : 00 [",
                "Interrupt : 00000002",
                "Source : 09 [",
                "Interrupt : 00000009",
                "Flags (decoded below) : 000D Polarity : 1 Trigger Mode : 3",
                "Processor ID : FF",
                "Interrupt Input LINT : 01",
            ],
        );
        assert_round_trips(dir, table(&tables, "APIC"), true);

        let xsdt = disassemble(dir, table(&tables, "XSDT"));
        assert_mentions(
            "XSDT",
            &xsdt,
            &[
                &format!("ACPI Table Address 0 : {:016X}", addr("FACP")),
                &format!("ACPI Table Address 1 : {:016X}", addr("APIC")),
                &format!("ACPI Table Address 2 : {:016X}", addr("MCFG")),
            ],
        );
        assert!(!xsdt.contains("ACPI Table Address 3"), "{xsdt}");
        assert_round_trips(dir, table(&tables, "XSDT"), true);

        let mcfg = disassemble(dir, table(&tables, "MCFG"));
        assert_mentions(
            "MCFG",
            &mcfg,
            &[
                "Signature : \"MCFG\" [Memory Mapped Configuration table]",
                "Revision : 01",
                "Oem ID : \"VANGRD\"",
                "Reserved : 0000000000000000",
                "[02Ch 0044 8] Base Address : 00000000E0000000 \
                 [034h 0052 2] Segment Group Number : 0000 \
                 [036h 0054 1] Start Bus Number : 00 \
                 [037h 0055 1] End Bus Number : 00 \
                 [038h 0056 4] Reserved : 00000000",
            ],
        );
        assert_eq!(mcfg.matches("Base Address :").count(), 1, "one ECAM allocation:\n{mcfg}");
        assert_round_trips(dir, table(&tables, "MCFG"), true);

        let facs = disassemble(dir, table(&tables, "FACS"));
        assert_mentions(
            "FACS",
            &facs,
            &["Signature : \"FACS\"", "Length : 00000040", "Version : 02"],
        );
        assert_round_trips(dir, table(&tables, "FACS"), false);

        let dsdt = disassemble(dir, table(&tables, "DSDT"));
        assert_mentions(
            "DSDT",
            &dsdt,
            &[
                "DefinitionBlock (\"\", \"DSDT\", 2, \"VANGRD\", \"VANGUARD\", 0x00000001)",
                "Name (\\_S5, Package (0x04) // _S5_: S5 System State { 0x05, Zero, Zero, Zero })",
                "Scope (\\_SB) { Device (COM1)",
                "Name (_HID, EisaId (\"PNP0501\")",
                "Name (_UID, Zero)",
                "IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum \
                 0x01, // Alignment 0x08, // Length )",
                "IRQNoFlags () {4}",
                "Name (_HID, EisaId (\"PNP0303\")",
                "IO (Decode16, 0x0060, // Range Minimum 0x0060, // Range Maximum",
                "IO (Decode16, 0x0064, // Range Minimum 0x0064, // Range Maximum",
                "IRQNoFlags () {1}",
            ],
        );
        assert_pci_host_bridge(&dsdt);
        // The compiler optimises the AML differently, so only check that the ASL is clean.
        compile(dir, "DSDT");
    }
}

/// The host bridge and the ECAM reservation, as iasl reads them back from the DSDT.
fn assert_pci_host_bridge(dsdt: &str) {
    assert_mentions(
        "DSDT",
        dsdt,
        &[
            "Device (PCI0) { Name (_HID, EisaId (\"PNP0A08\") /* PCI Express Bus */) \
             // _HID: Hardware ID Name (_CID, EisaId (\"PNP0A03\") /* PCI Bus */) \
             // _CID: Compatible ID Name (_SEG, Zero) // _SEG: PCI Segment \
             Name (_UID, Zero) // _UID: Unique ID \
             Name (_BBN, Zero) // _BBN: BIOS Bus Number",
            "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, \
             0x0000, // Granularity 0x0000, // Range Minimum 0x0000, // Range Maximum \
             0x0000, // Translation Offset 0x0001, // Length ,, )",
            "IO (Decode16, 0x0CF8, // Range Minimum 0x0CF8, // Range Maximum \
             0x01, // Alignment 0x08, // Length )",
            "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, \
             0x0000, // Granularity 0x0000, // Range Minimum 0x0CF7, // Range Maximum \
             0x0000, // Translation Offset 0x0CF8, // Length ,, , TypeStatic, DenseTranslation)",
            "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, \
             0x0000, // Granularity 0x0D00, // Range Minimum 0xFFFF, // Range Maximum \
             0x0000, // Translation Offset 0xF300, // Length ,, , TypeStatic, DenseTranslation)",
            "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, \
             ReadWrite, 0x00000000, // Granularity 0xC0000000, // Range Minimum \
             0xCFFFFFFF, // Range Maximum 0x00000000, // Translation Offset \
             0x10000000, // Length ,, , AddressRangeMemory, TypeStatic)",
            "Device (MRES) { Name (_HID, EisaId (\"PNP0C02\") /* PNP Motherboard Resources */) \
             // _HID: Hardware ID Name (_UID, Zero) // _UID: Unique ID \
             Name (_CRS, ResourceTemplate () // _CRS: Current Resource Settings { \
             Memory32Fixed (ReadWrite, 0xE0000000, // Address Base \
             0x00100000, // Address Length ) })",
        ],
    );
    // The ECAM window is reserved by MRES, not offered to BARs by the bridge.
    let pci0 = dsdt.find("Device (PCI0)").unwrap();
    let mres = dsdt.find("Device (MRES)").unwrap();
    assert!(pci0 < mres && !dsdt[pci0..mres].contains("0xE0000000"), "{dsdt}");
    assert!(!dsdt.contains("_ADR"), "PCI0 has a _HID, so no _ADR:\n{dsdt}");
}

/// A VM with only virtio-mmio devices: no MCFG, no host bridge, the legacy devices unchanged.
#[test]
fn iasl_without_pci() {
    if !have_iasl() {
        return;
    }
    let dir = ScratchDir::new("nopci");
    let mut cfg = AcpiConfig::new(2);
    cfg.pci = false;
    cfg.virtio_mmio = vec![arch::acpi::VirtioMmioInfo { base: 0xd000_0000, len: 0x200, gsi: 16 }];
    let tables = build_tables(&cfg, ACPI_START).unwrap();
    assert!(tables.get("MCFG").is_none());

    let xsdt = disassemble(&dir.0, table(&tables, "XSDT"));
    assert_mentions("XSDT", &xsdt, &["ACPI Table Address 1 :"]);
    assert!(!xsdt.contains("ACPI Table Address 2"), "{xsdt}");
    assert_round_trips(&dir.0, table(&tables, "XSDT"), true);

    let dsdt = disassemble(&dir.0, table(&tables, "DSDT"));
    assert_mentions(
        "DSDT",
        &dsdt,
        &["Device (COM1)", "EisaId (\"PNP0303\")", "Device (VR00)", "Name (_HID, \"LNRO0005\")"],
    );
    for absent in ["PNP0A08", "PNP0A03", "PNP0C02", "PCI0", "MRES", "0xE0000000", "0x0CF8"] {
        assert!(!dsdt.contains(absent), "DSDT without PCI mentions {absent}:\n{dsdt}");
    }
    compile(&dir.0, "DSDT");
}

#[test]
fn iasl_computes_the_same_rsdp() {
    if !have_iasl() {
        return;
    }
    let dir = ScratchDir::new("rsdp");
    let tables = build_tables(&AcpiConfig::new(2), ACPI_START).unwrap();
    let rsdp = &table(&tables, "RSDP").bytes;
    let le = |range: std::ops::Range<usize>| {
        rsdp[range].iter().rev().map(|b| format!("{b:02X}")).collect::<String>()
    };
    // Checksums left at 0 for iasl to fill in; every other field copied from our bytes.
    let source = format!(
        "[0008] Signature : \"{}\"\n\
         [0001] Checksum : 00\n\
         [0006] Oem ID : \"{}\"\n\
         [0001] Revision : {}\n\
         [0004] RSDT Address : {}\n\
         [0004] Length : {}\n\
         [0008] XSDT Address : {}\n\
         [0001] Extended Checksum : 00\n\
         [0003] Reserved : {}\n",
        std::str::from_utf8(&rsdp[0..8]).unwrap(),
        std::str::from_utf8(&rsdp[9..15]).unwrap(),
        le(15..16),
        le(16..20),
        le(20..24),
        le(24..32),
        le(33..36),
    );
    std::fs::write(dir.0.join("RSDP.dsl"), source).unwrap();
    assert_eq!(&compile(&dir.0, "RSDP"), rsdp);
    assert_eq!(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()), table(&tables, "XSDT").addr.0);
}

/// virtio-mmio devices in the DSDT: the `_HID` Linux's virtio_mmio driver matches, the register
/// window, and the edge-triggered interrupt, as iasl reads them back.
#[test]
fn iasl_reads_virtio_mmio_devices() {
    if !have_iasl() {
        return;
    }
    let dir = ScratchDir::new("virtio");
    let mut cfg = AcpiConfig::new(1);
    cfg.virtio_mmio = vec![
        arch::acpi::VirtioMmioInfo { base: 0xd000_0000, len: 0x200, gsi: 16 },
        arch::acpi::VirtioMmioInfo { base: 0xd000_1000, len: 0x200, gsi: 17 },
    ];
    let tables = build_tables(&cfg, ACPI_START).unwrap();
    let dsl = disassemble(&dir.0, table(&tables, "DSDT"));
    assert_mentions(
        "DSDT",
        &dsl,
        &[
            "Device (VR00)",
            "Device (VR01)",
            "Name (_HID, \"LNRO0005\")",
            "Memory32Fixed (ReadWrite, 0xD0000000, // Address Base 0x00000200, // Address Length )",
            "Memory32Fixed (ReadWrite, 0xD0001000,",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000010, }",
            "{ 0x00000011, }",
        ],
    );
    compile(&dir.0, "DSDT");
}
