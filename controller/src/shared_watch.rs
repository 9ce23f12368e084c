//! One watch of a kind, shared by everything in the process that reads it.
//!
//! A [`SharedWatch`] owns the kind's only watcher stream and its only
//! reflector [`Store`]. The future [`SharedWatch::new`] returns drives the
//! watch: each event is applied to the store, then offered to the
//! subscribers ([`SharedWatch::subscribe`]) through a broadcast channel of
//! [`EVENTS_KEPT`] events.
//!
//! # Guarantees
//!
//! - **Nothing waits for a subscriber.** The watch never blocks on a
//!   subscriber: one that is slow, or not polled at all (a controller
//!   held until its own store is ready, say), only falls behind. The
//!   store, and so everything that waits for it to be ready, moves on
//!   regardless. A design in which the watch waited for its slowest
//!   subscriber was tried and, on the real cluster, left the leading
//!   replica with a store that never became ready.
//! - **The store first.** An event is in the store before any subscriber
//!   can receive it, so a consumer reading the store after an event never
//!   sees it older than that event.
//! - **Nothing missed.** A subscription starts, once the store holds a
//!   complete listing, with that listing (`Init`, one `InitApply` per
//!   object, `InitDone`) and goes on with the events after it. A
//!   subscriber that falls more than [`EVENTS_KEPT`] events behind is
//!   given the store's current listing again, as a watcher gives after a
//!   relist. An event may come twice (once in a listing, once after it),
//!   never older than what came before it for the same object; deletions
//!   a subscriber fell behind on are not replayed, as after a relist.
//!   Level-triggered reconciles, which read the store, need no more.
//! - **Errors stay here.** Watch errors are logged, not passed on; the
//!   watcher's own backoff retries. Subscriptions carry `Result` items only
//!   so that kube's stream adapters take them.
//! - When the watch stops (its future ended or was dropped), every
//!   subscription ends, and later ones end at once.

use std::future::Future;
use std::pin::pin;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt, stream};
use kube::Resource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::watch;
use tracing::{debug, warn};

/// Events kept for subscribers that have not taken them yet. One that
/// falls further behind starts again from a listing of the store.
pub const EVENTS_KEPT: usize = 256;

/// One watch of `K`: its reflector store, and the channel its events go
/// out on. Cheap to clone; clones share the watch.
pub struct SharedWatch<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    /// Weak: the watch's future holds the only sender, so its end closes
    /// the channel and ends every subscription.
    events: broadcast::WeakSender<watcher::Event<K>>,
    /// True once the store has held a complete listing.
    listed: watch::Receiver<bool>,
}

impl<K: Resource<DynamicType = ()> + 'static> Clone for SharedWatch<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            events: self.events.clone(),
            listed: self.listed.clone(),
        }
    }
}

impl<K> std::fmt::Debug for SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWatch")
            .field("kind", &K::kind(&()))
            .field("objects", &self.store.len())
            .field(
                "subscribers",
                &self.events.upgrade().map_or(0, |s| s.receiver_count()),
            )
            .finish()
    }
}

impl<K> SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    /// The watch over `events` (a watcher stream, with its backoff), and
    /// the future that runs it. Nothing reaches the store or the
    /// subscribers until that future runs; dropping it stops the watch.
    pub fn new<S>(events: S) -> (Self, impl Future<Output = ()> + Send + 'static)
    where
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let (store, writer) = reflector::store();
        // The watch keeps no receiver of its own: subscribers subscribe.
        let (sender, _) = broadcast::channel(EVENTS_KEPT);
        let (listed_sender, listed) = watch::channel(false);
        let watch = Self {
            store,
            events: sender.downgrade(),
            listed,
        };
        let run = async move {
            let mut writer = writer;
            let kind = K::kind(&());
            let mut events = pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        writer.apply_watcher_event(&event);
                        if matches!(event, watcher::Event::InitDone) {
                            listed_sender.send_replace(true);
                        }
                        // An error here only means nobody subscribes now.
                        let _ = sender.send(event);
                    }
                    Err(error) => warn!(%kind, %error, "watch failed; retrying after a backoff"),
                }
            }
            // The only senders go here: every subscription ends once it
            // has taken what was sent, and nobody waits for a listing.
        };
        (watch, run)
    }

    /// The store: it holds every event any subscriber has received, and
    /// may be ahead of them.
    ///
    /// To wait for its first listing, use [`Self::listed`], never
    /// `Store::wait_until_ready` from more than one place: kube-runtime
    /// 5.0's readiness is a oneshot receiver that keeps only the waker of
    /// the last task that polled it, so of two tasks waiting on the same
    /// store at once, one may never wake. (A kube `Controller` given the
    /// store waits on it that way itself; each store is given to one.)
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Waits until the store has held a complete listing; false if the
    /// watch stopped first. Any number of tasks may wait at once.
    pub async fn listed(&self) -> bool {
        let mut listed = self.listed.clone();
        listed.wait_for(|listed| *listed).await.is_ok()
    }

    /// The watch's events from now on, starting with a complete listing
    /// (see the module's guarantees). It waits while the store has never
    /// held a complete listing.
    pub fn subscribe(&self) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>> {
        let Some(sender) = self.events.upgrade() else {
            return stream::empty().boxed();
        };
        let subscription = Subscription {
            store: self.store.clone(),
            events: sender.subscribe(),
            listed: self.listed.clone(),
            phase: Phase::WaitingForListing,
        };
        stream::unfold(subscription, |mut subscription| async move {
            subscription.next().await.map(|event| (Ok(event), subscription))
        })
        .boxed()
    }
}

/// Where a subscription is.
enum Phase<K> {
    /// The store has never held a complete listing.
    WaitingForListing,
    /// Handing out a listing of the store.
    Listing(std::vec::IntoIter<watcher::Event<K>>),
    /// Handing out events as they come.
    Live,
}

struct Subscription<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    events: broadcast::Receiver<watcher::Event<K>>,
    listed: watch::Receiver<bool>,
    phase: Phase<K>,
}

impl<K> Subscription<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    /// The next event, or `None` once the watch has stopped.
    async fn next(&mut self) -> Option<watcher::Event<K>> {
        loop {
            match &mut self.phase {
                Phase::WaitingForListing => {
                    // Err: the watch stopped before its first listing.
                    self.listed.wait_for(|listed| *listed).await.ok()?;
                    self.start_from_listing()?;
                }
                Phase::Listing(listing) => match listing.next() {
                    Some(event) => return Some(event),
                    None => self.phase = Phase::Live,
                },
                Phase::Live => match self.events.recv().await {
                    Ok(event) => return Some(event),
                    Err(RecvError::Lagged(missed)) => {
                        debug!(kind = %K::kind(&()), missed, "subscriber fell behind; listing the store again");
                        self.start_from_listing()?;
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }

    /// Drops the events queued for this subscriber and starts from the
    /// store's listing instead. Every dropped event was applied to the
    /// store before it was sent, so the listing, taken after, holds it.
    /// `None` when the watch has stopped.
    fn start_from_listing(&mut self) -> Option<()> {
        loop {
            match self.events.try_recv() {
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return None,
            }
        }
        let listing: Vec<_> = std::iter::once(watcher::Event::Init)
            .chain(
                self.store
                    .state()
                    .into_iter()
                    .map(|object| watcher::Event::InitApply(std::sync::Arc::unwrap_or_clone(object))),
            )
            .chain(std::iter::once(watcher::Event::InitDone))
            .collect();
        self.phase = Phase::Listing(listing.into_iter());
        Some(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::ResourceExt;
    use tokio::sync::mpsc;

    use super::*;

    type Source = mpsc::UnboundedSender<Result<watcher::Event<ConfigMap>, watcher::Error>>;
    type Events = BoxStream<'static, Result<watcher::Event<ConfigMap>, watcher::Error>>;

    fn object(name: &str, version: u32) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                resource_version: Some(version.to_string()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    /// A watch over events sent through the returned sender, running on
    /// its own task.
    fn started() -> (SharedWatch<ConfigMap>, Source, tokio::task::JoinHandle<()>) {
        let (source, mut events) = mpsc::unbounded_channel();
        let (watch, run) = SharedWatch::new(stream::poll_fn(move |cx| events.poll_recv(cx)));
        let task = tokio::spawn(run);
        (watch, source, task)
    }

    fn send(source: &Source, events: impl IntoIterator<Item = watcher::Event<ConfigMap>>) {
        for event in events {
            source.send(Ok(event)).unwrap();
        }
    }

    fn listed(names: &[&str]) -> Vec<watcher::Event<ConfigMap>> {
        std::iter::once(watcher::Event::Init)
            .chain(names.iter().map(|n| watcher::Event::InitApply(object(n, 1))))
            .chain(std::iter::once(watcher::Event::InitDone))
            .collect()
    }

    /// Lets every other task run until it waits (paused time only moves
    /// once every task is idle).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    fn text(event: &watcher::Event<ConfigMap>) -> String {
        let version = |o: &ConfigMap| o.resource_version().unwrap_or_default();
        match event {
            watcher::Event::Init => "init".to_owned(),
            watcher::Event::InitApply(o) => format!("list {}@{}", o.name_any(), version(o)),
            watcher::Event::InitDone => "listed".to_owned(),
            watcher::Event::Apply(o) => format!("apply {}@{}", o.name_any(), version(o)),
            watcher::Event::Delete(o) => format!("delete {}", o.name_any()),
        }
    }

    /// Everything `events` has ready now, as text; a listing's objects
    /// come in no particular order, so each listing is sorted.
    async fn took(events: &mut Events) -> Vec<String> {
        settle().await;
        let mut out: Vec<String> = Vec::new();
        let mut listing_from = None;
        while let Some(Some(event)) = futures::FutureExt::now_or_never(events.next()) {
            let line = text(&event.unwrap());
            match line.as_str() {
                "init" => listing_from = Some(out.len() + 1),
                "listed" => {
                    if let Some(from) = listing_from.take() {
                        out[from..].sort();
                    }
                }
                _ => {}
            }
            out.push(line);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_before_the_first_listing_waits_for_it_then_gets_events() {
        let (watch, source, _task) = started();
        let mut events = watch.subscribe();
        send(
            &source,
            [watcher::Event::Init, watcher::Event::InitApply(object("a", 1))],
        );
        assert!(
            took(&mut events).await.is_empty(),
            "nothing before the listing is complete"
        );
        send(
            &source,
            [
                watcher::Event::InitApply(object("b", 1)),
                watcher::Event::InitDone,
            ],
        );
        assert_eq!(
            took(&mut events).await,
            ["init", "list a@1", "list b@1", "listed"]
        );
        send(&source, [watcher::Event::Apply(object("a", 2))]);
        assert_eq!(took(&mut events).await, ["apply a@2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn every_task_waiting_for_the_first_listing_wakes() {
        // As in the controller's leader: two controllers' subscriptions and
        // the readiness probe wait for the same store at the same time.
        let (watch, source, _task) = started();
        let mut first = watch.subscribe();
        let mut second = watch.subscribe();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let watch = watch.clone();
                tokio::spawn(async move { watch.listed().await })
            })
            .collect();
        // Every waiter polled once and parked before the listing comes.
        assert!(took(&mut first).await.is_empty());
        assert!(took(&mut second).await.is_empty());
        send(&source, listed(&["a"]));
        assert_eq!(took(&mut first).await, ["init", "list a@1", "listed"]);
        assert_eq!(took(&mut second).await, ["init", "list a@1", "listed"]);
        for waiter in waiters {
            let listed = tokio::time::timeout(Duration::from_secs(1), waiter).await;
            assert!(listed.expect("a waiter was never woken").unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_subscriber_starts_from_the_store() {
        let (watch, source, _task) = started();
        send(&source, listed(&["a", "b"]));
        send(
            &source,
            [
                watcher::Event::Delete(object("a", 1)),
                watcher::Event::Apply(object("c", 2)),
            ],
        );
        settle().await;
        let mut events = watch.subscribe();
        assert_eq!(
            took(&mut events).await,
            ["init", "list b@1", "list c@2", "listed"]
        );
        send(&source, [watcher::Event::Apply(object("b", 3))]);
        assert_eq!(took(&mut events).await, ["apply b@3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_never_polled_holds_up_neither_the_store_nor_the_others() {
        let (watch, source, _task) = started();
        let _stalled = watch.subscribe();
        let mut live = watch.subscribe();
        send(&source, listed(&["a"]));
        assert_eq!(took(&mut live).await, ["init", "list a@1", "listed"]);
        // Four times what the channel keeps; the live subscriber takes
        // them a batch at a time and misses none.
        let last = 1 + 4 * u32::try_from(EVENTS_KEPT).unwrap();
        for batch in (2..=last).collect::<Vec<_>>().chunks(64) {
            send(
                &source,
                batch.iter().map(|v| watcher::Event::Apply(object("a", *v))),
            );
            let got = took(&mut live).await;
            let wanted: Vec<_> = batch.iter().map(|v| format!("apply a@{v}")).collect();
            assert_eq!(got, wanted);
        }
        let stored = watch.store().state();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].resource_version(), Some(last.to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_fell_behind_is_given_the_store_again() {
        let (watch, source, _task) = started();
        let mut behind = watch.subscribe();
        send(&source, listed(&["a", "b"]));
        assert_eq!(took(&mut behind).await.len(), 4);
        let last = u32::try_from(EVENTS_KEPT).unwrap() + 10;
        for version in 2..=last {
            send(&source, [watcher::Event::Apply(object("a", version))]);
        }
        send(&source, [watcher::Event::Delete(object("b", 1))]);
        settle().await;
        // Fell behind by more than the channel keeps: the current listing,
        // nothing older after it.
        assert_eq!(
            took(&mut behind).await,
            ["init".to_owned(), format!("list a@{last}"), "listed".to_owned()]
        );
        send(&source, [watcher::Event::Apply(object("d", 1))]);
        assert_eq!(took(&mut behind).await, ["apply d@1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_stay_in_the_watch() {
        let (watch, source, _task) = started();
        let mut events = watch.subscribe();
        source.send(Err(watcher::Error::NoResourceVersion)).unwrap();
        send(&source, listed(&["a"]));
        assert_eq!(took(&mut events).await, ["init", "list a@1", "listed"]);
    }

    #[tokio::test(start_paused = true)]
    async fn subscriptions_end_when_the_watch_stops() {
        let (watch, source, task) = started();
        let mut before = watch.subscribe();
        send(&source, listed(&["a"]));
        assert_eq!(took(&mut before).await.len(), 3);
        drop(source); // the watcher stream ends, and the watch with it
        task.await.unwrap();
        let mut after = watch.subscribe();
        assert!(before.next().await.is_none());
        assert!(after.next().await.is_none());
    }
}
