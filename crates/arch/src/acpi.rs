//! ACPI tables for x86-64 guests: how a guest kernel learns how many vCPUs it has, where the
//! interrupt controllers are, which legacy devices exist, and how to power off and reboot.
//!
//! The tables go in the legacy BIOS area (`ACPI_START..ACPI_END`) with the RSDP first, so a
//! kernel booted without firmware finds the RSDP by its 16-byte-aligned scan of 0xE0000..0xFFFFF.
//! Layout in guest memory, in address order:
//!
//! | table | contents |
//! |-------|----------|
//! | RSDP  | revision 2, points at the XSDT (no RSDT) |
//! | FACS  | 64-byte aligned, as the spec requires |
//! | DSDT  | `\_S5_`, COM1, the i8042 keyboard controller, virtio-mmio devices, and (with PCI) the host bridge `\_SB.PCI0` and the ECAM reservation `\_SB.MRES` |
//! | APIC  | the MADT: one local APIC per vCPU, the IOAPIC, ISA overrides, LINT1 NMI |
//! | FACP  | the FADT: full (not hardware-reduced) ACPI with PM1a event/control blocks |
//! | MCFG  | only with PCI: the ECAM window of segment 0, buses `0..=PCI_BUS_END` |
//! | XSDT  | FADT, MADT and (with PCI) MCFG |
//!
//! Table builders come from the `acpi_tables` crate; where it has no builder for an x86 structure
//! (MADT interrupt source overrides and NMI entries, MADT flags, the legacy IRQ descriptor) the
//! bytes are assembled here.

use crate::layout::{
    ACPI_END, ACPI_START, COM1_IRQ, COM1_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT,
    I8042_RESET_COMMAND, IOAPIC_START, LAPIC_START, PCI_BUS_END, PCI_CONFIG_PORT,
    PCI_CONFIG_PORT_LEN, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START,
    PM1A_CNT_PORT, PM1A_EVT_PORT, SCI_IRQ, SLP_TYP_S5,
};
use acpi_tables::aml::{self, Path};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Largest vCPU count the tables describe: xAPIC IDs are 8 bits, 0xff is the broadcast ID, and
/// the IOAPIC takes the ID right after the last vCPU.
pub const MAX_CPUS: u8 = 254;

/// OEM ID in the RSDP and every table header.
pub const OEM_ID: [u8; 6] = *b"VANGRD";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"VANGUARD";
const OEM_REVISION: u32 = 1;

/// Legacy scanners only look at 16-byte boundaries, and 16 keeps every other table's 64-bit
/// fields naturally aligned too.
const TABLE_ALIGN: u64 = 16;
/// The spec requires the FACS to be 64-byte aligned.
const FACS_ALIGN: u64 = 64;

/// Every table header is 36 bytes; the MADT adds the local APIC address and flags.
const SDT_HEADER_LEN: u32 = 36;
const MADT_HEADER_LEN: u32 = SDT_HEADER_LEN + 8;
/// Revision 2 makes AML integers 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// ACPI 6.3's MADT revision: new enough that Linux reads the flags as the current spec defines
/// them, old enough that Debian bookworm's iasl (20200925) still decodes the table.
const MADT_REVISION: u8 = 5;

// MADT structure types and flags (ACPI 6.5, section 5.2.12).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
const MPS_POLARITY_ACTIVE_HIGH: u16 = 0b01;
const MPS_TRIGGER_EDGE: u16 = 0b01 << 2;
const MPS_TRIGGER_LEVEL: u16 = 0b11 << 2;
/// Processor UID meaning "every processor" in a local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;
/// NMIs reach every local APIC through LINT1, as on PC hardware.
const NMI_LINT: u8 = 1;
/// The PIT's ISA IRQ 0 arrives at IOAPIC input 2 on PC-compatible machines. With KVM's
/// in-kernel irqchip this holds only if the VMM routes GSI 0 to IOAPIC pin 2, since KVM's
/// default routing sends it to pin 0.
const PIT_ISA_IRQ: u8 = 0;
const PIT_GSI: u32 = 2;
/// The i8042 keyboard interrupt line. The port map does not name it because no Vanguard code
/// besides the DSDT refers to it.
const I8042_KBD_IRQ: u32 = 1;

// FADT IAPC_BOOT_ARCH bits.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// PM1 event block: 2-byte status then 2-byte enable register.
const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;

// Layout constants narrowed to the width of the ACPI fields that hold them. The asserts make a
// change to `layout.rs` that would not fit fail the build instead of producing bad tables.
const _: () = assert!(ACPI_END <= 1 << 32, "32-bit table pointers must reach every table");
#[allow(clippy::cast_possible_truncation)] // Guarded by the assert.
const LAPIC_ADDR32: u32 = {
    assert!(LAPIC_START <= u32::MAX as u64);
    LAPIC_START as u32
};
#[allow(clippy::cast_possible_truncation)] // Guarded by the assert.
const IOAPIC_ADDR32: u32 = {
    assert!(IOAPIC_START <= u32::MAX as u64);
    IOAPIC_START as u32
};
#[allow(clippy::cast_possible_truncation)] // Guarded by the assert.
const SCI_ISA_IRQ: u8 = {
    // The SCI override below assumes the SCI is an ISA IRQ, i.e. below 16.
    assert!(SCI_IRQ < 16);
    SCI_IRQ as u8
};
const SCI_INT: u16 = SCI_ISA_IRQ as u16;
const COM1_IRQ_MASK: u16 = {
    assert!(COM1_IRQ < 16);
    1 << COM1_IRQ
};
const I8042_IRQ_MASK: u16 = 1 << I8042_KBD_IRQ;

/// The only PCI segment; its number goes in the MCFG and in the host bridge's `_SEG`.
const PCI_SEGMENT: u16 = 0;
/// The host bridge's bus, the first of its range (`_BBN`).
const PCI_BUS_START: u8 = 0;
#[allow(clippy::cast_possible_truncation)] // Guarded by the assert.
const PCI_MMIO_START32: u32 = {
    assert!(PCI_MMIO_SIZE > 0 && PCI_MMIO_START + PCI_MMIO_SIZE <= 1 << 32);
    PCI_MMIO_START as u32
};
/// Last byte (inclusive) of the BAR window, as the address space descriptors want it.
#[allow(clippy::cast_possible_truncation)] // Guarded by the assert above.
const PCI_MMIO_LAST32: u32 = (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32;
#[allow(clippy::cast_possible_truncation)] // Guarded by the assert.
const PCI_ECAM_START32: u32 = {
    assert!(PCI_ECAM_SIZE > 0 && PCI_ECAM_START + PCI_ECAM_SIZE <= 1 << 32);
    PCI_ECAM_START as u32
};
#[allow(clippy::cast_possible_truncation)] // Guarded by the assert above.
const PCI_ECAM_SIZE32: u32 = PCI_ECAM_SIZE as u32;
/// The I/O ports the bridge forwards: everything except its own configuration ports, split into
/// the ranges below and above them.
const PCI_IO_LOW_LAST: u16 = {
    assert!(PCI_CONFIG_PORT > 0 && PCI_CONFIG_PORT_LEN > 0);
    PCI_CONFIG_PORT - 1
};
const PCI_IO_HIGH_FIRST: u16 = {
    assert!((PCI_CONFIG_PORT as u32) + (PCI_CONFIG_PORT_LEN as u32) <= u16::MAX as u32);
    PCI_CONFIG_PORT + PCI_CONFIG_PORT_LEN
};
#[allow(clippy::cast_possible_truncation)] // Guarded by the assert.
const PCI_CONFIG_PORT_LEN8: u8 = {
    assert!(PCI_CONFIG_PORT_LEN <= u8::MAX as u16);
    PCI_CONFIG_PORT_LEN as u8
};

/// What the ACPI tables describe about the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, `1..=MAX_CPUS`; vCPU `i` has APIC ID and ACPI processor UID `i`.
    pub num_cpus: u8,
    /// virtio-mmio devices, described in the DSDT (`_HID` "LNRO0005") so that kernels without
    /// command-line device discovery (Debian's) find them.
    pub virtio_mmio: Vec<VirtioMmioInfo>,
    /// Whether there is a PCI host bridge (for virtio-pci): an MCFG table for its ECAM window,
    /// and in the DSDT the bridge `\_SB.PCI0` with its bus, I/O and BAR-window resources plus
    /// a motherboard-resources device `\_SB.MRES` reserving the ECAM window. Without it (a VM
    /// with only virtio-mmio devices) none of these exist.
    pub pci: bool,
}

impl AcpiConfig {
    /// A machine with `num_cpus` vCPUs, a PCI host bridge and no virtio-mmio devices.
    pub fn new(num_cpus: u8) -> Self {
        Self { num_cpus, virtio_mmio: Vec::new(), pci: true }
    }
}

/// Where one virtio-mmio device is: its register window and its (edge-triggered) GSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioInfo {
    /// Guest-physical base of the register window (below 4 GiB).
    pub base: u32,
    /// Length of the window.
    pub len: u32,
    /// The IOAPIC interrupt line.
    pub gsi: u32,
}

/// Errors while building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is 0 or above [`MAX_CPUS`].
    #[error("cannot describe {0} vCPUs in ACPI: between 1 and {MAX_CPUS} are supported")]
    InvalidCpuCount(u8),
    /// The requested base is not a place a guest would find an RSDP.
    #[error(
        "ACPI tables cannot start at {0:#x}: the RSDP must be 16-byte aligned \
         in {ACPI_START:#x}..{ACPI_END:#x}"
    )]
    InvalidBase(u64),
    /// The tables would run past the end of the ACPI region.
    #[error("ACPI table {table} would end at {end:#x}, past the ACPI region's end {ACPI_END:#x}")]
    TooLarge {
        /// The table that did not fit.
        table: &'static str,
        /// Where it would have ended (exclusive); `u64::MAX` if that overflows.
        end: u64,
    },
    /// Writing a table to guest memory failed, e.g. because guest RAM does not cover it.
    #[error("cannot write ACPI table {table} to guest memory at {addr:#x}")]
    GuestMemory {
        /// The table being written.
        table: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// What the guest memory reported.
        #[source]
        source: GuestMemoryError,
    },
}

/// One ACPI table, ready to be copied into guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// The table's signature as text: "RSDP" for the RSDP (whose real signature is
    /// "RSD PTR "), otherwise the 4-byte header signature ("FACP" for the FADT, "APIC" for the
    /// MADT).
    pub name: &'static str,
    /// Guest-physical address of the first byte.
    pub addr: GuestAddress,
    /// The complete table, checksum included.
    pub bytes: Vec<u8>,
}

/// The full set of ACPI tables, in ascending address order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Where the RSDP is: the address a guest needs (e.g. in `boot_params.acpi_rsdp_addr`).
    pub rsdp_addr: GuestAddress,
    /// Every table, RSDP included, in ascending, non-overlapping address order.
    pub tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// The table named `name` (see [`AcpiTable::name`]), if present.
    pub fn get(&self, name: &str) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| t.name == name)
    }
}

/// Writes RSDP, XSDT, FADT (+FACS), MADT, DSDT and (with PCI) MCFG into guest memory from `ACPI_START` and
/// returns the RSDP's guest address, which is `ACPI_START`.
///
/// Guest RAM must cover the tables, and the e820 map should keep `ACPI_START..ACPI_END` out of
/// usable RAM so the guest does not overwrite them before parsing them.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(cfg, ACPI_START)?;
    for table in &tables.tables {
        mem.write_slice(&table.bytes, table.addr).map_err(|source| AcpiError::GuestMemory {
            table: table.name,
            addr: table.addr.0,
            source,
        })?;
    }
    Ok(tables.rsdp_addr)
}

/// Builds every table for placement from `base`, without touching guest memory.
///
/// `base` must be 16-byte aligned and inside `ACPI_START..ACPI_END`; the RSDP goes at `base` and
/// every table must end by `ACPI_END`.
pub fn build_tables(cfg: &AcpiConfig, base: u64) -> Result<AcpiTables, AcpiError> {
    if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::InvalidCpuCount(cfg.num_cpus));
    }
    if !(ACPI_START..ACPI_END).contains(&base) || base.next_multiple_of(TABLE_ALIGN) != base {
        return Err(AcpiError::InvalidBase(base));
    }

    let mut placer = Placer { next: base, tables: Vec::new() };
    // The RSDP is built last, since it points at the XSDT, but it must sit exactly at `base`:
    // reserve its slot now.
    let rsdp_addr = placer.reserve("RSDP", Rsdp::len(), TABLE_ALIGN)?;
    let mut facs = FACS::new();
    // The crate writes version 1 (ACPI 2.0); version 2 is the layout since ACPI 4.0 and the one
    // that goes with a 6.5 FADT.
    facs.version = 2;
    let facs_addr = placer.place("FACS", aml_bytes(&facs), FACS_ALIGN)?;
    let dsdt_addr = placer.place("DSDT", build_dsdt(cfg), TABLE_ALIGN)?;
    let madt_addr = placer.place("APIC", build_madt(cfg.num_cpus), TABLE_ALIGN)?;
    let fadt_addr = placer.place("FACP", build_fadt(facs_addr, dsdt_addr)?, TABLE_ALIGN)?;
    let mcfg_addr =
        if cfg.pci { Some(placer.place("MCFG", build_mcfg(), TABLE_ALIGN)?) } else { None };

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(addr) = mcfg_addr {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = placer.place("XSDT", aml_bytes(&xsdt), TABLE_ALIGN)?;

    let mut tables = placer.tables;
    tables[0].bytes = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(AcpiTables { rsdp_addr: GuestAddress(rsdp_addr), tables })
}

/// Hands out consecutive, aligned addresses from the base and records what goes there.
struct Placer {
    next: u64,
    tables: Vec<AcpiTable>,
}

impl Placer {
    /// Places `bytes` at the next `align`-aligned address and returns that address.
    fn place(&mut self, name: &'static str, bytes: Vec<u8>, align: u64) -> Result<u64, AcpiError> {
        let overflow = || AcpiError::TooLarge { table: name, end: u64::MAX };
        let addr = self.next.checked_next_multiple_of(align).ok_or_else(overflow)?;
        let end = u64::try_from(bytes.len())
            .ok()
            .and_then(|len| addr.checked_add(len))
            .ok_or_else(overflow)?;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge { table: name, end });
        }
        self.next = end;
        self.tables.push(AcpiTable { name, addr: GuestAddress(addr), bytes });
        Ok(addr)
    }

    /// Places `len` zero bytes, to be filled in once their contents are known.
    fn reserve(&mut self, name: &'static str, len: usize, align: u64) -> Result<u64, AcpiError> {
        self.place(name, vec![0; len], align)
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// A full ACPI platform rather than a hardware-reduced one, because Linux only powers off and
/// resets through ACPI on x86 when it has the PM1 blocks and the reset register.
fn build_fadt(facs_addr: u64, dsdt_addr: u64) -> Result<Vec<u8>, AcpiError> {
    let addr32 = |table: &'static str, addr: u64| {
        u32::try_from(addr).map_err(|_| AcpiError::TooLarge { table, end: addr })
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // SLP_BUTTON set means there is *no* sleep button; PWR_BUTTON stays clear so the
        // guest uses the fixed-feature power button in PM1.
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    // ACPI 6 requires FIRMWARE_CTRL to be zero when X_FIRMWARE_CTRL is set (Linux otherwise
    // installs the FACS twice). DSDT and X_DSDT may both be set; fill both for older OSes.
    fadt.firmware_ctrl = 0.into();
    fadt.x_firmware_ctrl = facs_addr.into();
    fadt.dsdt = addr32("DSDT", dsdt_addr)?.into();
    fadt.x_dsdt = dsdt_addr.into();
    // SMI_CMD stays 0: the platform is always in ACPI mode, so OSPM never issues ACPI_ENABLE.
    fadt.sci_int = SCI_INT.into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    fadt.pm1_evt_len = PM1_EVT_LEN;
    fadt.pm1_cnt_len = PM1_CNT_LEN;
    fadt.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        PM1_EVT_LEN * 8,
        0,
        AccessSize::WordAccess,
        u64::from(PM1A_EVT_PORT),
    );
    fadt.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        PM1_CNT_LEN * 8,
        0,
        AccessSize::WordAccess,
        u64::from(PM1A_CNT_PORT),
    );
    // No PM timer (PM_TMR_BLK 0), no GPE blocks: both optional since ACPI 5.0A.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT).into();
    // Reset by pulsing the i8042's reset line, which the keyboard controller model implements.
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(I8042_COMMAND_PORT),
    );
    fadt.reset_value = I8042_RESET_COMMAND;
    Ok(aml_bytes(&fadt.finalize()))
}

/// Built on the generic `Sdt` rather than the crate's `MADT`, which can neither set the
/// PCAT_COMPAT flag nor hold structures it has no type for.
fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut madt =
        Sdt::new(*b"APIC", MADT_HEADER_LEN, MADT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR32);
    // PCAT_COMPAT: there are also 8259 PICs, which the OS must mask when it uses the APICs.
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled)));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(num_cpus, IOAPIC_ADDR32, 0)));
    madt.append_slice(&interrupt_source_override(
        PIT_ISA_IRQ,
        PIT_GSI,
        MPS_POLARITY_ACTIVE_HIGH | MPS_TRIGGER_EDGE,
    ));
    // ISA IRQs default to edge-triggered; the SCI is a level-triggered, shareable line.
    madt.append_slice(&interrupt_source_override(
        SCI_ISA_IRQ,
        u32::from(SCI_ISA_IRQ),
        MPS_POLARITY_ACTIVE_HIGH | MPS_TRIGGER_LEVEL,
    ));
    madt.append_slice(&local_apic_nmi(
        ALL_PROCESSORS,
        MPS_POLARITY_ACTIVE_HIGH | MPS_TRIGGER_EDGE,
        NMI_LINT,
    ));
    madt.as_slice().to_vec()
}

/// The MCFG: one allocation for the ECAM window of segment 0, covering the host bridge's buses.
fn build_mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, PCI_SEGMENT, PCI_BUS_START, PCI_BUS_END);
    aml_bytes(&mcfg)
}

/// MADT type 2: ISA `source` IRQ is wired to global system interrupt `gsi`.
fn interrupt_source_override(source: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut entry = vec![MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, 0 /* ISA bus */, source];
    entry.extend_from_slice(&gsi.to_le_bytes());
    entry.extend_from_slice(&flags.to_le_bytes());
    entry
}

/// MADT type 4: which local APIC input (LINT0/1) of processor `uid` carries NMIs.
fn local_apic_nmi(uid: u8, flags: u16, lint: u8) -> Vec<u8> {
    let mut entry = vec![MADT_TYPE_LOCAL_APIC_NMI, 6, uid];
    entry.extend_from_slice(&flags.to_le_bytes());
    entry.push(lint);
    entry
}

/// The small IRQ descriptor (ASL `IRQNoFlags`): ISA edge-triggered, active-high, exclusive,
/// which is what these legacy devices are. The crate only offers the extended descriptor.
struct IrqNoFlags {
    mask: u16,
}

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small resource item 0x04 (IRQ), 2 bytes long: 0b0_0100_010.
        sink.byte(0x22);
        sink.word(self.mask);
    }
}

/// Already-encoded AML, spliced into a scope.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        for b in self.0 {
            sink.byte(*b);
        }
    }
}

/// `\_SB.PCI0`, the PCI Express host bridge of segment 0, and `\_SB.MRES`, which reserves its
/// ECAM window as a motherboard resource, each as encoded AML.
///
/// The bridge decodes every I/O port but its own configuration ports, as a PC's does, so the
/// legacy devices' ports (COM1, the i8042, the PM1 blocks) lie inside its windows. Its memory
/// window is only the BAR window: Linux checks that the MCFG's ECAM window is reserved by a
/// PNP0C01/PNP0C02 device, and a window in the bridge's `_CRS` would instead be handed out to
/// BARs.
///
/// There is no `_ADR`: the spec says a device has either `_HID` or `_ADR`, not both (iasl warns
/// about the pair), and a root bridge is identified by `_SEG`/`_BBN`, not by an address.
fn pci_host_bridge_aml() -> [Vec<u8>; 2] {
    let hid = aml::Name::new(Path::new("_HID"), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new(Path::new("_CID"), &aml::EISAName::new("PNP0A03"));
    let seg = aml::Name::new(Path::new("_SEG"), &PCI_SEGMENT);
    let uid = aml::Name::new(Path::new("_UID"), &aml::ZERO);
    let bbn = aml::Name::new(Path::new("_BBN"), &PCI_BUS_START);
    let buses = aml::AddressSpace::new_bus_number(u16::from(PCI_BUS_START), u16::from(PCI_BUS_END));
    let config_ports = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORT_LEN8);
    let io_low = aml::AddressSpace::new_io(0u16, PCI_IO_LOW_LAST, None);
    let io_high = aml::AddressSpace::new_io(PCI_IO_HIGH_FIRST, u16::MAX, None);
    let bars = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START32,
        PCI_MMIO_LAST32,
        None,
    );
    let crs = aml::Name::new(
        Path::new("_CRS"),
        &aml::ResourceTemplate::new(vec![&buses, &config_ports, &io_low, &io_high, &bars]),
    );
    let pci0 = aml::Device::new(Path::new("PCI0"), vec![&hid, &cid, &seg, &uid, &bbn, &crs]);

    let mres_hid = aml::Name::new(Path::new("_HID"), &aml::EISAName::new("PNP0C02"));
    let mres_uid = aml::Name::new(Path::new("_UID"), &aml::ZERO);
    let ecam = aml::Memory32Fixed::new(true, PCI_ECAM_START32, PCI_ECAM_SIZE32);
    let mres_crs = aml::Name::new(Path::new("_CRS"), &aml::ResourceTemplate::new(vec![&ecam]));
    let mres = aml::Device::new(Path::new("MRES"), vec![&mres_hid, &mres_uid, &mres_crs]);

    [aml_bytes(&pci0), aml_bytes(&mres)]
}

fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let virtio_mmio = &cfg.virtio_mmio;
    // SLP_TYPa and SLP_TYPb for S5, then two reserved elements.
    let s5 = aml::Name::new(
        Path::new("\\_S5_"),
        &aml::Package::new(vec![&SLP_TYP_S5, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );

    let com1_hid = aml::Name::new(Path::new("_HID"), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new(Path::new("_UID"), &aml::ZERO);
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = IrqNoFlags { mask: COM1_IRQ_MASK };
    let com1_crs =
        aml::Name::new(Path::new("_CRS"), &aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]));
    let com1 = aml::Device::new(Path::new("COM1"), vec![&com1_hid, &com1_uid, &com1_crs]);

    let kbd_hid = aml::Name::new(Path::new("_HID"), &aml::EISAName::new("PNP0303"));
    let kbd_data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let kbd_cmd = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let kbd_irq = IrqNoFlags { mask: I8042_IRQ_MASK };
    let kbd_crs = aml::Name::new(
        Path::new("_CRS"),
        &aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]),
    );
    let kbd = aml::Device::new(Path::new("PS2K"), vec![&kbd_hid, &kbd_crs]);

    // One device per virtio-mmio window, named VR00, VR01, ...
    let mut virtio_parts = Vec::with_capacity(virtio_mmio.len());
    for (i, dev) in virtio_mmio.iter().enumerate() {
        let name = format!("VR{:02X}", i & 0xff);
        let hid = aml::Name::new(Path::new("_HID"), &"LNRO0005");
        let uid_value = u32::try_from(i).unwrap_or(u32::MAX);
        virtio_parts.push((name, hid, uid_value, *dev));
    }
    let virtio_devices: Vec<Vec<u8>> = virtio_parts
        .iter()
        .map(|(name, hid, uid_value, dev)| {
            let uid = aml::Name::new(Path::new("_UID"), uid_value);
            let window = aml::Memory32Fixed::new(true, dev.base, dev.len);
            let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
            let crs =
                aml::Name::new(Path::new("_CRS"), &aml::ResourceTemplate::new(vec![&window, &irq]));
            aml_bytes(&aml::Device::new(Path::new(name), vec![hid, &uid, &crs]))
        })
        .collect();
    let pci_devices: Vec<Vec<u8>> = if cfg.pci { pci_host_bridge_aml().into() } else { Vec::new() };
    let raw_devices: Vec<RawAml> =
        virtio_devices.iter().chain(&pci_devices).map(|b| RawAml(b)).collect();
    let mut sb_children: Vec<&dyn Aml> = vec![&com1, &kbd];
    sb_children.extend(raw_devices.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new(Path::new("\\_SB_"), sb_children);

    let mut dsdt =
        Sdt::new(*b"DSDT", SDT_HEADER_LEN, DSDT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt.append_slice(&aml_bytes(&sb));
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    const CPU_COUNTS: [u8; 4] = [1, 2, 8, 254];

    fn build(num_cpus: u8) -> AcpiTables {
        build_tables(&AcpiConfig::new(num_cpus), ACPI_START).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(bytes[off..off + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
    }

    fn table<'a>(tables: &'a AcpiTables, name: &str) -> &'a AcpiTable {
        tables.get(name).unwrap_or_else(|| panic!("no {name} table"))
    }

    /// (type, bytes) of each MADT interrupt controller structure, checking the lengths chain.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let len = usize::from(madt[off + 1]);
            assert!(len >= 2 && off + len <= madt.len(), "bad MADT entry at {off}");
            entries.push((madt[off], &madt[off..off + len]));
            off += len;
        }
        assert_eq!(off, madt.len());
        entries
    }

    #[test]
    fn headers_checksums_and_lengths() {
        for n in CPU_COUNTS {
            let tables = build(n);
            let names: Vec<_> = tables.tables.iter().map(|t| t.name).collect();
            assert_eq!(names, ["RSDP", "FACS", "DSDT", "APIC", "FACP", "MCFG", "XSDT"]);
            for t in &tables.tables {
                let b = &t.bytes;
                match t.name {
                    "RSDP" => {
                        assert_eq!(&b[..8], b"RSD PTR ");
                        assert_eq!(sum(&b[..20]), 0, "RSDP 20-byte checksum");
                        assert_eq!(sum(b), 0, "RSDP extended checksum");
                        assert_eq!(&b[9..15], &OEM_ID);
                        assert_eq!(b[15], 2, "RSDP revision");
                        assert_eq!(u32_at(b, 16), 0, "no RSDT");
                        assert_eq!(u32_at(b, 20) as usize, b.len());
                        assert_eq!(b.len(), 36);
                    }
                    "FACS" => {
                        assert_eq!(&b[..4], b"FACS");
                        assert_eq!(u32_at(b, 4) as usize, b.len());
                        assert_eq!(b.len(), 64);
                        assert_eq!(b[32], 2, "FACS version");
                    }
                    name => {
                        assert_eq!(&b[..4], name.as_bytes());
                        assert_eq!(u32_at(b, 4) as usize, b.len(), "{name} length");
                        assert_eq!(sum(b), 0, "{name} checksum");
                        assert_eq!(&b[10..16], &OEM_ID, "{name} OEM ID");
                        assert_eq!(&b[16..24], &OEM_TABLE_ID, "{name} OEM table ID");
                    }
                }
            }
        }
    }

    #[test]
    fn layout_is_consecutive_aligned_and_inside_the_acpi_region() {
        for n in CPU_COUNTS {
            let tables = build(n);
            assert_eq!(tables.rsdp_addr, GuestAddress(ACPI_START));
            assert_eq!(tables.tables[0].addr, tables.rsdp_addr);
            let mut prev_end = ACPI_START;
            for t in &tables.tables {
                let align = if t.name == "FACS" { 64 } else { 16 };
                assert_eq!(t.addr.0 % align, 0, "{} alignment", t.name);
                assert!(t.addr.0 >= prev_end, "{} overlaps its predecessor", t.name);
                assert!(t.addr.0 - prev_end < align, "gap before {}", t.name);
                prev_end = t.addr.0 + t.bytes.len() as u64;
            }
            assert!(prev_end <= ACPI_END);
        }
    }

    #[test]
    fn rsdp_and_xsdt_point_at_the_right_tables() {
        let tables = build(4);
        let rsdp = &table(&tables, "RSDP").bytes;
        let xsdt = table(&tables, "XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt.addr.0);

        let entries: Vec<u64> = xsdt.bytes[36..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = table(&tables, "FACP");
        let madt = table(&tables, "APIC");
        let mcfg = table(&tables, "MCFG");
        assert_eq!(entries, [fadt.addr.0, madt.addr.0, mcfg.addr.0]);
        for addr in entries {
            let target = tables.tables.iter().find(|t| t.addr.0 == addr).unwrap();
            assert_eq!(&target.bytes[..4], target.name.as_bytes());
        }
    }

    #[test]
    fn fadt_fields() {
        let tables = build(1);
        let f = &table(&tables, "FACP").bytes;
        let facs = table(&tables, "FACS").addr.0;
        let dsdt = table(&tables, "DSDT").addr.0;
        assert_eq!(f.len(), 276);
        assert_eq!((f[8], f[131]), (6, 5), "FADT revision 6.5");
        assert_eq!(u32_at(f, 36), 0, "FIRMWARE_CTRL must be zero when X_FIRMWARE_CTRL is set");
        assert_eq!(u64::from(u32_at(f, 40)), dsdt, "DSDT");
        assert_eq!(u64_at(f, 132), facs, "X_FIRMWARE_CTRL");
        assert_eq!(u64_at(f, 140), dsdt, "X_DSDT");
        assert_eq!(u16_at(f, 46), 9, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(f, 76), 0, "PM_TMR_BLK");
        assert_eq!((f[88], f[89], f[91]), (4, 2, 0), "PM1_EVT/PM1_CNT/PM_TMR lengths");
        assert_eq!(u16_at(f, 109), 0b110, "IAPC_BOOT_ARCH: 8042, no VGA");
        let flags = u32_at(f, 112);
        assert_eq!(flags, 1 | (1 << 2) | (1 << 5) | (1 << 10));
        assert_eq!(flags & (1 << 4), 0, "fixed-feature power button present");
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        // RESET_REG: system I/O, 8 bits, offset 0, byte access, port 0x64.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 120), 0x64);
        assert_eq!(f[128], 0xfe, "RESET_VALUE");
        // X_PM1a_EVT_BLK and X_PM1a_CNT_BLK: system I/O, 32 and 16 bits wide.
        assert_eq!(&f[148..152], &[1, 32, 0, 2]);
        assert_eq!(u64_at(f, 152), 0x600);
        assert_eq!(&f[172..176], &[1, 16, 0, 2]);
        assert_eq!(u64_at(f, 176), 0x604);
    }

    #[test]
    fn madt_describes_every_cpu_and_the_interrupt_routing() {
        for n in CPU_COUNTS {
            let tables = build(n);
            let madt = &table(&tables, "APIC").bytes;
            assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
            assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
            let entries = madt_entries(madt);

            let lapics: Vec<_> = entries.iter().filter(|(ty, _)| *ty == 0).collect();
            assert_eq!(lapics.len(), usize::from(n));
            for (i, (_, e)) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!(usize::from(e[2]), i, "processor UID");
                assert_eq!(usize::from(e[3]), i, "APIC ID");
                assert_eq!(u32_at(e, 4), 1, "enabled");
            }

            let ioapics: Vec<_> = entries.iter().filter(|(ty, _)| *ty == 1).collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0].1;
            assert_eq!((io[2], u32_at(io, 4), u32_at(io, 8)), (n, 0xfec0_0000, 0));

            let overrides: Vec<_> = entries
                .iter()
                .filter(|(ty, _)| *ty == 2)
                .map(|(_, e)| (e[2], e[3], u32_at(e, 4), u16_at(e, 8)))
                .collect();
            assert_eq!(overrides, [(0, 0, 2, 0b0101), (0, 9, 9, 0b1101)]);

            let nmis: Vec<_> = entries.iter().filter(|(ty, _)| *ty == 4).collect();
            assert_eq!(nmis.len(), 1);
            let nmi = nmis[0].1;
            assert_eq!((nmi[2], u16_at(nmi, 3), nmi[5]), (0xff, 0b0101, 1));

            assert_eq!(entries.len(), usize::from(n) + 4, "no other entries");
        }
    }

    #[test]
    fn dsdt_has_s5_and_the_legacy_devices() {
        let tables = build(1);
        let dsdt = &table(&tables, "DSDT").bytes;
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        // Name(\_S5_, Package(4) { 5, Zero, Zero, Zero })
        assert!(contains(&[
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0
        ]));
        assert!(contains(b"_SB_"));
        assert!(contains(b"COM1"));
        assert!(contains(b"PS2K"));
        // EISAID("PNP0501") and EISAID("PNP0303") as DWord constants.
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x03, 0x03]));
        // IO(Decode16, 0x3f8, 0x3f8, 1, 8) and IRQNoFlags() {4}.
        assert!(contains(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00]));
        // IO 0x60, IO 0x64, IRQNoFlags() {1}.
        assert!(contains(&[0x47, 0x01, 0x60, 0, 0x60, 0, 1, 1]));
        assert!(contains(&[0x47, 0x01, 0x64, 0, 0x64, 0, 1, 1, 0x22, 0x02, 0x00]));
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn mcfg_describes_the_ecam_window() {
        let tables = build(2);
        let m = &table(&tables, "MCFG").bytes;
        assert_eq!(m.len(), 36 + 8 + 16);
        assert_eq!(m[8], 1, "MCFG revision");
        assert_eq!(sum(m), 0, "MCFG checksum");
        assert_eq!(&m[36..44], &[0; 8], "reserved");
        assert_eq!(u64_at(m, 44), 0xe000_0000, "ECAM base");
        assert_eq!(u16_at(m, 52), 0, "segment");
        assert_eq!((m[54], m[55]), (0, PCI_BUS_END), "bus range");
        assert_eq!(&m[56..60], &[0; 4], "reserved");
    }

    #[test]
    fn dsdt_has_the_pci_host_bridge_and_the_ecam_reservation() {
        let tables = build(1);
        let dsdt = &table(&tables, "DSDT").bytes;
        let has = |needle: &[u8]| contains(dsdt, needle);
        assert!(has(b"PCI0"));
        assert!(has(b"MRES"));
        // EISAID("PNP0A08"), EISAID("PNP0A03") and EISAID("PNP0C02").
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        // WordBusNumber 0..=0: producer, min/max fixed, length 1.
        assert!(has(&[0x88, 0x0d, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
        // IO(Decode16, 0xcf8, 0xcf8, 1, 8).
        assert!(has(&[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]));
        // WordIO 0x0000..=0x0cf7 and 0x0d00..=0xffff, entire range.
        assert!(has(&[0x88, 0x0d, 0, 1, 0x0c, 3, 0, 0, 0, 0, 0xf7, 0x0c, 0, 0, 0xf8, 0x0c]));
        assert!(has(&[0x88, 0x0d, 0, 1, 0x0c, 3, 0, 0, 0, 0x0d, 0xff, 0xff, 0, 0, 0, 0xf3]));
        // DWordMemory 0xc0000000..=0xcfffffff, non-cacheable, read-write.
        let mut bars = vec![0x87, 0x17, 0, 0, 0x0c, 1, 0, 0, 0, 0];
        for v in [0xc000_0000u32, 0xcfff_ffff, 0, 0x1000_0000] {
            bars.extend_from_slice(&v.to_le_bytes());
        }
        assert!(has(&bars));
        // Memory32Fixed(ReadWrite, 0xe0000000, 0x100000) in MRES only, never in PCI0.
        let ecam = [0x86, 0x09, 0, 1, 0, 0, 0, 0xe0, 0, 0, 0x10, 0];
        assert!(has(&ecam));
        let pci0 = dsdt.windows(4).position(|w| w == b"PCI0").unwrap();
        let mres = dsdt.windows(4).position(|w| w == b"MRES").unwrap();
        assert!(!contains(&dsdt[pci0..mres], &ecam[4..8]), "ECAM base inside PCI0");
        assert!(contains(&dsdt[mres..], &ecam));
    }

    #[test]
    fn without_pci_there_is_no_mcfg_and_no_host_bridge() {
        let mut cfg = AcpiConfig::new(2);
        cfg.pci = false;
        let tables = build_tables(&cfg, ACPI_START).unwrap();
        let names: Vec<_> = tables.tables.iter().map(|t| t.name).collect();
        assert_eq!(names, ["RSDP", "FACS", "DSDT", "APIC", "FACP", "XSDT"]);
        let xsdt = &table(&tables, "XSDT").bytes;
        assert_eq!(xsdt.len(), 36 + 2 * 8, "XSDT holds only the FADT and the MADT");
        assert_eq!(sum(xsdt), 0);
        let dsdt = &table(&tables, "DSDT").bytes;
        assert_eq!(sum(dsdt), 0);
        for absent in [&b"PCI0"[..], b"MRES", &[0x0c, 0x41, 0xd0, 0x0a, 0x08]] {
            assert!(!contains(dsdt, absent), "{absent:x?} in a DSDT without PCI");
        }
        assert!(contains(dsdt, b"COM1") && contains(dsdt, b"PS2K"));

        // The legacy part of the DSDT is the same with and without PCI: the bridge and MRES are
        // only appended to `\_SB_`.
        let with_pci = build_tables(&AcpiConfig::new(2), ACPI_START).unwrap();
        let pci_dsdt = &table(&with_pci, "DSDT").bytes;
        let com1 = dsdt.windows(4).position(|w| w == b"COM1").unwrap();
        let pci_com1 = pci_dsdt.windows(4).position(|w| w == b"COM1").unwrap();
        assert_eq!(&dsdt[com1..], &pci_dsdt[pci_com1..pci_com1 + dsdt.len() - com1]);
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        for n in [0, 255] {
            let err = build_tables(&AcpiConfig::new(n), ACPI_START).unwrap_err();
            assert!(matches!(err, AcpiError::InvalidCpuCount(c) if c == n), "{err}");
        }
    }

    #[test]
    fn rejects_bad_bases_and_tables_past_the_region() {
        let cfg = AcpiConfig::new(254);
        for base in [0, ACPI_START - 16, ACPI_START + 8, ACPI_END] {
            let err = build_tables(&cfg, base).unwrap_err();
            assert!(matches!(err, AcpiError::InvalidBase(b) if b == base), "{err}");
        }
        let err = build_tables(&cfg, ACPI_END - 0x400).unwrap_err();
        assert!(matches!(err, AcpiError::TooLarge { end, .. } if end > ACPI_END), "{err}");
        // The highest base that still fits works.
        let size = {
            let t = build_tables(&cfg, ACPI_START).unwrap();
            let last = t.tables.last().unwrap();
            last.addr.0 + last.bytes.len() as u64 - ACPI_START
        };
        // Keep the base's offset from a 64-byte boundary, so the FACS padding stays the same.
        let base = (ACPI_END - size) / 64 * 64;
        assert!(build_tables(&cfg, base).is_ok());
    }

    #[test]
    fn writes_tables_into_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let cfg = AcpiConfig::new(8);
        let rsdp = create_acpi_tables(&mem, &cfg).unwrap();
        assert_eq!(rsdp, GuestAddress(ACPI_START));

        // Find the RSDP the way a legacy OS does: 16-byte steps through 0xE0000..0xFFFFF.
        let found = (ACPI_START..ACPI_END).step_by(16).find(|&addr| {
            let mut buf = [0u8; 20];
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            &buf[..8] == b"RSD PTR " && sum(&buf) == 0
        });
        assert_eq!(found, Some(ACPI_START));

        for t in build_tables(&cfg, ACPI_START).unwrap().tables {
            let mut buf = vec![0u8; t.bytes.len()];
            mem.read_slice(&mut buf, t.addr).unwrap();
            assert_eq!(buf, t.bytes, "{} in guest memory", t.name);
        }
    }

    #[test]
    fn reports_guest_memory_that_does_not_cover_the_tables() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 512 << 10)]).unwrap();
        let err = create_acpi_tables(&mem, &AcpiConfig::new(1)).unwrap_err();
        assert!(
            matches!(err, AcpiError::GuestMemory { table: "RSDP", addr: ACPI_START, .. }),
            "{err}"
        );
    }
}
