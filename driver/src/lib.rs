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

pub use igbvf::{IgbVf, IgbVfConfig, IgbVfError};
pub use mempool::{Mempool, PacketBuf};
pub use nic::{LinkStatus, MacAddress, NicDevice, Stats};
pub use poll::{PollMode, Poller};

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
