//! The guest-physical memory map and I/O port map that Vanguard presents to every x86-64 guest.
//!
//! These values are guest ABI: the test guest, the ACPI tables and the device models all rely on
//! them, so a change here is a change to what every guest sees.

/// Where the VMM puts the boot GDT (used only until the kernel loads its own).
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the VMM puts an empty boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables built by the VMM for the 64-bit entry: PML4, PDPT, then PDs.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// First page directory of the boot page tables (the boot map covers the first 4 GiB,
/// so four consecutive page directories follow from here).
pub const PDE_START: u64 = 0xb000;
/// Number of page directories (1 GiB each) the boot page tables identity-map.
pub const BOOT_PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line (including the NUL) accepted: Linux x86's COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// PVH `hvm_start_info` and its memory map follow the command line.
pub const PVH_INFO_START: u64 = 0x6000;
/// Start of the memory map's first hole (the EBDA and the legacy BIOS area).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the legacy BIOS area so a guest can also find the RSDP by scanning.
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the region reserved for ACPI tables.
pub const ACPI_END: u64 = 0x100000;
/// Start of high memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x100000;

/// The 32-bit hole for MMIO (PCI BARs, IOAPIC, LAPIC): guest RAM never overlaps it; RAM that
/// would fall here is placed above 4 GiB instead.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// One page reserved for KVM's identity map (KVM_SET_IDENTITY_MAP_ADDR).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// Three pages reserved for KVM's real-mode TSS (KVM_SET_TSS_ADDR).
pub const KVM_TSS_START: u64 = 0xfeff_d000;

/// COM1 16550A UART: ports 0x3f8..=0x3ff, IRQ 4.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 keyboard controller data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 keyboard controller command/status port; writing 0xfe resets the machine.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 command that pulses the reset line.
pub const I8042_RESET_COMMAND: u8 = 0xfe;
/// ACPI PM1a event block: status (2 bytes) then enable (2 bytes).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block (2 bytes): SLP_TYP in bits 10..=12, SLP_EN in bit 13.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// The SLP_TYP value for S5 (soft off) that the DSDT's `_S5_` object advertises.
pub const SLP_TYP_S5: u16 = 5;
/// ACPI system control interrupt line.
pub const SCI_IRQ: u32 = 9;
/// Opt-in debug-exit port: a write of N ends the VM with exit status N.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Opt-in boot-timer port: the guest writes here when it reaches its payload.
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// First virtio-mmio register window (inside the 32-bit MMIO hole).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Distance between consecutive virtio-mmio windows.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; device `n` uses `VIRTIO_MMIO_GSI_BASE + n` (IOAPIC-only
/// lines 16..=23, so at most 8 devices).
pub const VIRTIO_MMIO_GSI_BASE: u32 = 16;
/// Most virtio-mmio devices (one per free IOAPIC line).
pub const VIRTIO_MMIO_MAX_DEVICES: usize = 8;

/// Smallest guest memory size accepted.
pub const MIN_MEMORY: u64 = 16 << 20;

/// PCI (virtio-pci, the default transport): one host bridge, segment 0, bus 0 only.
/// BARs are assigned by the VMM inside this 32-bit window (below the virtio-mmio windows).
pub const PCI_MMIO_START: u64 = 0xc000_0000;
/// Size of the window BARs are placed in.
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// The PCI Express enhanced configuration (ECAM) window: 4 KiB per function, bus 0 only,
/// described to the guest by the MCFG table.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window (bus 0: 32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// Last bus number behind the host bridge.
pub const PCI_BUS_END: u8 = 0;
/// The legacy configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Ports used by the legacy configuration mechanism (0xcf8..=0xcff).
pub const PCI_CONFIG_PORT_LEN: u16 = 8;
/// First GSI handed out for MSI-X vectors (after the 24 IOAPIC pins).
pub const MSI_GSI_START: u32 = 24;
