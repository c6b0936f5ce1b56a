//! x86-64 machine description for Vanguard guests: the memory and port map, the Linux boot
//! protocol (boot_params, e820, PVH start info), boot page tables and GDT, CPUID and MSR setup,
//! and the ACPI tables that tell a guest which vCPUs and devices it has.
//!
//! This crate knows nothing about KVM file descriptors or threads: it computes and writes guest
//! memory and register values; the `vmm` crate applies them.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod msr;
