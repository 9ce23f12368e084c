//! vfplane's in-pod poll-mode driver: a VF handed to the pod (through the
//! device plugin's `PCIDEVICE_VFPLANE_IO_*` variables and `/dev/vfio`)
//! driven from user space with no kernel on the packet path.
//!
//! - [`vfio`]: container, group, device, BAR0, MSI-X eventfd.
//! - [`dma`]: hugepage or 4 KiB DMA memory with IOVAs inside the IOMMU's ranges.
//! - [`mempool`]: packet buffers that return to their pool on drop.
//! - [`nic`]: the [`NicDevice`] trait (`rx_burst`, `tx_burst`, link, MAC, stats).
//! - [`igbvf`]: the Intel 82576 VF driver; [`regs`] its registers;
//!   [`mailbox`] the PF mailbox.
//! - [`poll`]: hybrid busy-poll / interrupt waiting.
//! - `model` (feature `model`, and in this crate's own tests): an in-memory
//!   82576 VF for tests and benchmarks; not in a build that does not ask.
//! - [`env`]: which VFs the pod has.
//!
//! # A process that is killed
//!
//! What is promised, and by whom, when the process driving a VF ends.
//!
//! - **Clean exit** (the [`IgbVf`] dropped, also when a panic unwinds): the
//!   driver masks the VF's interrupts, disables its RX and TX queues and
//!   resets it (`CTRL.RST`) before its rings and buffers are freed; then
//!   the VFIO device, group and container are closed.
//! - **Killed** (`SIGKILL`, the OOM killer, `panic = "abort"`, a crash): no
//!   `Drop` runs, and the VF is left as it was: queues enabled, descriptors
//!   pointing at the dead process's buffers. What makes that safe is the
//!   kernel closing the process's descriptors. Releasing the VFIO device,
//!   vfio-pci clears the VF's Bus Master Enable (it can no longer DMA),
//!   tears down its MSI-X eventfd and attempts a function-level reset (an
//!   82576 VF supports FLR); closing the container unmaps every IOVA from
//!   the IOMMU and unpins the pages, so the device could not reach that
//!   memory even if it tried, and the memory (hugepages included: they are
//!   anonymous, no hugetlbfs file is left) goes back to the system. PF-side
//!   state the VF asked for over the mailbox (its MAC when the PF assigned
//!   none, multicast list, large frames) stays with the PF driver until the
//!   VF is reset.
//! - **The node side**: when the kubelet no longer lists the VF's container
//!   and no process holds `/dev/vfio/<group>` open, the agent scrubs the VF
//!   before it can be handed to anyone else: a function-level reset through
//!   sysfs, the spec's MAC, VLAN, spoof checking, trust, rate and link state
//!   written back through the PF, and a check that the PF reports them and
//!   Bus Master Enable is clear; a VF that fails is quarantined. A container
//!   restarted in the same pod keeps its VF: the kubelet still lists it, so
//!   no scrub runs between the two processes.
//! - **A restarted process** (same pod, same VF) calls [`open_igbvf`]
//!   again, as at first start; nothing of the dead process's state is
//!   reused. vfio-pci resets the function when the device is opened, the
//!   driver sets Memory Space and Bus Master again, resets the VF and
//!   negotiates with the PF from scratch, and builds new rings and buffers.
//!   Frames the dead process had received or queued are lost. With neither
//!   a PF-assigned MAC nor [`IgbVfConfig::mac`], the VF comes back with a
//!   new random MAC: set `mac` (or have the administrator assign one) when
//!   peers must keep addressing the same one. The VF's hardware counters
//!   ([`IgbVf::hw_counters`]) need not start from zero: compare deltas. Until the
//!   old process has fully exited (its descriptors closed), the VF's group
//!   is still open, and [`open_igbvf`] fails with [`OpenError::Vfio`]:
//!   retry after a short wait.
//!
//! ```no_run
//! use vfplane_driver::{NicDevice, open_igbvf, igbvf::IgbVfConfig};
//! let vfs = vfplane_driver::env::vfs_from_env()?;
//! let mut dev = open_igbvf(&vfs[0].pci, &IgbVfConfig::default())?;
//! let mut batch = Vec::with_capacity(64);
//! dev.rx_burst(&mut batch, 64);
//! dev.tx_burst(&mut batch);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod dma;
pub mod env;
pub mod igbvf;
pub mod mailbox;
pub mod mempool;
#[cfg(any(test, feature = "model"))]
pub mod model;
pub mod nic;
pub mod poll;
pub mod regs;
pub mod vfio;

pub use igbvf::{DmaPageSizes, IgbVf, IgbVfConfig, IgbVfError};
pub use mempool::{Mempool, PacketBuf};
pub use nic::{LinkStatus, MacAddress, NicDevice, Stats};
pub use poll::{PollFallback, PollMode, PollStats, Poller};

use thiserror::Error;

use crate::dma::{PagePolicy, VfioDma};
use crate::vfio::{VfioOpenError, VfioVf};

/// Errors of opening a VF.
#[derive(Debug, Error)]
pub enum OpenError {
    /// VFIO could not open it.
    #[error("cannot open {pci} through VFIO")]
    Vfio {
        /// The address.
        pci: String,
        /// Why.
        #[source]
        source: VfioOpenError,
    },
    /// The driver could not start it.
    #[error("cannot start the igbvf driver on {pci}")]
    Driver {
        /// The address.
        pci: String,
        /// Why.
        #[source]
        source: IgbVfError,
    },
}

/// Opens the VF at `pci` through VFIO and starts the igbvf driver on it,
/// with DMA memory from hugepages when there are any.
///
/// # Errors
/// See [`OpenError`].
pub fn open_igbvf(pci: &str, config: &IgbVfConfig) -> Result<IgbVf<VfioVf>, OpenError> {
    open_igbvf_with(pci, config, PagePolicy::Auto)
}

/// [`open_igbvf`] with an explicit page policy.
///
/// # Errors
/// See [`OpenError`].
pub fn open_igbvf_with(
    pci: &str,
    config: &IgbVfConfig,
    pages: PagePolicy,
) -> Result<IgbVf<VfioVf>, OpenError> {
    let vf = VfioVf::open(pci).map_err(|source| OpenError::Vfio {
        pci: pci.to_owned(),
        source,
    })?;
    let dma = VfioDma::new(
        std::sync::Arc::clone(vf.container()),
        vf.iommu().iova_allocator(),
        pages,
    );
    IgbVf::new(vf, &dma, config).map_err(|source| OpenError::Driver {
        pci: pci.to_owned(),
        source,
    })
}

/// An error with its sources, one line (for logs and a tool's message).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
