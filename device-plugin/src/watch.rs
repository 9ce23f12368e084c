//! inotify watches on the directories whose changes the plugin reacts to.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// What a watched directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WatchedDir {
    /// The kubelet's device-plugin directory.
    Kubelet,
    /// The directory holding the pool config file.
    Config,
    /// `<dev-root>/vfio`.
    Vfio,
    /// The VF state directory.
    State,
}

/// One event.
#[derive(Debug, Clone)]
pub(crate) struct FsEvent {
    /// Where.
    pub target: WatchedDir,
    /// The entry's name; `None` for events on the directory itself.
    pub name: Option<OsString>,
    /// What happened.
    pub mask: EventMask,
}

impl FsEvent {
    /// The watched directory itself went away (its watch is gone too).
    pub fn directory_gone(&self) -> bool {
        self.mask
            .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED)
    }

    /// The kernel dropped events: anything may have changed.
    pub fn overflowed(&self) -> bool {
        self.mask.contains(EventMask::Q_OVERFLOW)
    }

    /// An entry appeared (created or moved in).
    pub fn created(&self) -> bool {
        self.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
    }

    /// An entry went (deleted or moved out).
    pub fn removed(&self) -> bool {
        self.mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM)
    }

    /// The entry's name is `name`.
    pub fn is(&self, name: &str) -> bool {
        self.name.as_deref().is_some_and(|n| n == name)
    }
}

/// The watches, and the task that turns inotify events into [`FsEvent`]s.
#[derive(Debug)]
pub(crate) struct Watcher {
    watches: Watches,
    targets: Arc<Mutex<HashMap<WatchDescriptor, WatchedDir>>>,
    task: tokio::task::JoinHandle<()>,
}

const DIR_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

impl Watcher {
    /// Starts the inotify instance; events go to `events`.
    ///
    /// # Errors
    /// When inotify cannot be initialised.
    pub fn start(events: mpsc::UnboundedSender<FsEvent>) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        let mut stream = inotify.into_event_stream(vec![0u8; 16 * 1024])?;
        let watches = stream.watches();
        let targets: Arc<Mutex<HashMap<WatchDescriptor, WatchedDir>>> = Arc::default();
        let lookup = Arc::clone(&targets);
        let task = tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::error!(%error, "inotify read failed; file watching stops");
                        return;
                    }
                };
                let target = {
                    let map = lookup.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    map.get(&event.wd).copied()
                };
                let targets: Vec<WatchedDir> = match target {
                    Some(target) => vec![target],
                    // A queue overflow has no watch: tell everyone.
                    None if event.mask.contains(EventMask::Q_OVERFLOW) => vec![
                        WatchedDir::Kubelet,
                        WatchedDir::Config,
                        WatchedDir::Vfio,
                        WatchedDir::State,
                    ],
                    None => continue,
                };
                for target in targets {
                    let fs_event = FsEvent {
                        target,
                        name: event.name.clone(),
                        mask: event.mask,
                    };
                    if events.send(fs_event).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Self {
            watches,
            targets,
            task,
        })
    }

    /// Watches a directory (replacing an earlier watch of the same target).
    ///
    /// # Errors
    /// When the directory cannot be watched (it does not exist, say).
    pub fn watch(&self, target: WatchedDir, dir: &Path) -> io::Result<()> {
        let wd = self.watches.clone().add(dir, DIR_MASK)?;
        let mut targets = self
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        targets.retain(|_, t| *t != target);
        targets.insert(wd, target);
        Ok(())
    }

    /// True when the target has a live watch.
    pub fn is_watching(&self, target: WatchedDir) -> bool {
        self.targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .any(|t| *t == target)
    }

    /// Forgets the watch of a target whose directory went away.
    pub fn forget(&self, target: WatchedDir) {
        self.targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, t| *t != target);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
