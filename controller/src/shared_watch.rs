//! One watch of a kind, shared by everything in the process that reads it.
//!
//! A [`SharedWatch`] owns the kind's only watcher stream and its only
//! reflector [`Store`]. The future [`SharedWatch::new`] returns drives the
//! stream: each event is applied to the store, then cloned to every
//! subscriber ([`SharedWatch::subscribe`]) through a bounded channel of its
//! own.
//!
//! # Guarantees
//!
//! - **The store first.** An event is in the store before any subscriber
//!   can receive it, so a consumer reading the store after an event never
//!   sees it older than that event.
//! - **Every object, once.** A subscriber's stream is one a watcher started
//!   at that moment could have produced: a complete listing (`Init`, one
//!   `InitApply` per object, `InitDone`), then every event after it,
//!   relists included. A subscriber that joins while the store holds a
//!   complete listing starts from the store's contents at that moment; one
//!   that joins before the first listing or during a relist waits for that
//!   listing to end and starts from the store's contents then. The listing
//!   is taken and the subscriber registered under the same lock under
//!   which events are applied, so each event is either in its listing or
//!   among its events, never both and never neither.
//! - **Bounded.** Each subscriber has [`EVENTS_IN_FLIGHT`] events of room.
//!   When one is full, the watch waits for it: the store and the other
//!   subscribers wait too, and the API server's watch is read no further.
//!   A subscriber that drops its stream is forgotten at the next event.
//! - **Errors stay here.** Watch errors are logged, not passed on; the
//!   watcher's own backoff retries. Subscriber streams carry
//!   `Result` items only so that kube's stream adapters take them.
//! - When the watch stops (its source ended, or its future was dropped),
//!   every subscription ends, and later ones end at once.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::{FutureExt, Stream, StreamExt, stream};
use kube::Resource;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Events one subscriber may have received but not yet taken; past that,
/// the watch waits for it.
pub const EVENTS_IN_FLIGHT: usize = 128;

/// The store's contents, from which a subscriber starts.
type Listing<K> = Vec<Arc<K>>;

/// Where one subscriber's events go.
type EventSender<K> = mpsc::Sender<watcher::Event<K>>;

/// A subscriber waiting for a complete listing.
struct Waiting<K> {
    /// Where its listing goes.
    start: oneshot::Sender<Listing<K>>,
    /// Where the events after the listing go.
    events: EventSender<K>,
}

/// Who receives the events, and whether a new subscriber can start now.
struct Subscribers<K> {
    /// The store holds a complete listing: an `InitDone` came and no
    /// `Init` since.
    listed: bool,
    /// The watch stopped; nobody subscribes any more.
    stopped: bool,
    /// Subscribers that have their listing: they get every event.
    live: Vec<EventSender<K>>,
    /// Subscribers that joined while no complete listing was in the store:
    /// at the next `InitDone` each gets the store's contents, then events
    /// (one that left meanwhile is dropped then).
    waiting: Vec<Waiting<K>>,
}

impl<K> Subscribers<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// Applies `event` to the store and returns who should receive it.
    fn apply(
        &mut self,
        writer: &mut Writer<K>,
        store: &Store<K>,
        event: &watcher::Event<K>,
    ) -> Vec<EventSender<K>> {
        writer.apply_watcher_event(event);
        self.live.retain(|sender| !sender.is_closed());
        // Taken before the waiting subscribers join: the `InitDone` that
        // completes their listing is already in it.
        let receivers = self.live.clone();
        match event {
            watcher::Event::Init => self.listed = false,
            watcher::Event::InitDone => {
                self.listed = true;
                let listing = store.state();
                for waiting in self.waiting.drain(..) {
                    if waiting.start.send(listing.clone()).is_ok() {
                        self.live.push(waiting.events);
                    }
                }
            }
            watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitApply(_) => {}
        }
        receivers
    }
}

impl<K> Subscribers<K> {
    /// Ends every subscription.
    fn stop(&mut self) {
        self.stopped = true;
        self.live.clear();
        self.waiting.clear();
    }
}

/// One watch of `K`: its reflector store, and the subscribers its events
/// go to. Cheap to clone; clones share the watch.
pub struct SharedWatch<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    subscribers: Arc<Mutex<Subscribers<K>>>,
}

impl<K: Resource<DynamicType = ()> + 'static> Clone for SharedWatch<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            subscribers: Arc::clone(&self.subscribers),
        }
    }
}

impl<K> std::fmt::Debug for SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let subscribers = lock(&self.subscribers);
        f.debug_struct("SharedWatch")
            .field("kind", &K::kind(&()))
            .field("objects", &self.store.len())
            .field("listed", &subscribers.listed)
            .field("subscribers", &subscribers.live.len())
            .field("waiting", &subscribers.waiting.len())
            .finish()
    }
}

fn lock<K>(subscribers: &Mutex<Subscribers<K>>) -> MutexGuard<'_, Subscribers<K>> {
    // The lock is never held across code that can panic halfway through a
    // change, so a poisoned lock still guards consistent data.
    subscribers.lock().unwrap_or_else(PoisonError::into_inner)
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
        let subscribers = Arc::new(Mutex::new(Subscribers {
            listed: false,
            stopped: false,
            live: Vec::new(),
            waiting: Vec::new(),
        }));
        let watch = Self {
            store: store.clone(),
            subscribers: Arc::clone(&subscribers),
        };
        (watch, fan_out(events, writer, store, subscribers))
    }

    /// The store: it holds every event any subscriber has received, and
    /// may be ahead of them.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// A stream of the watch's events from now on, starting with a
    /// complete listing (see the module's guarantees). It waits while the
    /// watch has no complete listing, and ends when the watch stops.
    pub fn subscribe(
        &self,
    ) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + Unpin + 'static {
        let (sender, mut receiver) = mpsc::channel(EVENTS_IN_FLIGHT);
        let (start, started) = oneshot::channel();
        {
            let mut subscribers = lock(&self.subscribers);
            if subscribers.stopped {
                // Both senders dropped here: the stream ends at once.
            } else if subscribers.listed {
                // Under the lock: no event is applied between this listing
                // and the registration below.
                let _ = start.send(self.store.state());
                subscribers.live.push(sender);
            } else {
                subscribers.waiting.push(Waiting {
                    start,
                    events: sender,
                });
            }
        }
        stream::once(started.map(Result::ok))
            .flat_map(|listing| stream::iter(listing.into_iter().flat_map(listing_events)))
            .chain(stream::poll_fn(move |cx| receiver.poll_recv(cx)))
            .map(Ok)
    }
}

/// A listing as a watcher's events: `Init`, one `InitApply` per object,
/// `InitDone`.
fn listing_events<K: Clone>(listing: Listing<K>) -> impl Iterator<Item = watcher::Event<K>> {
    std::iter::once(watcher::Event::Init)
        .chain(
            listing
                .into_iter()
                .map(|object| watcher::Event::InitApply(Arc::unwrap_or_clone(object))),
        )
        .chain(std::iter::once(watcher::Event::InitDone))
}

/// Ends every subscription when the watch stops, however it stops.
struct StopOnDrop<K>(Arc<Mutex<Subscribers<K>>>);

impl<K> Drop for StopOnDrop<K> {
    fn drop(&mut self) {
        lock(&self.0).stop();
    }
}

async fn fan_out<K, S>(
    events: S,
    mut writer: Writer<K>,
    store: Store<K>,
    subscribers: Arc<Mutex<Subscribers<K>>>,
) where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let _stop = StopOnDrop(Arc::clone(&subscribers));
    let kind = K::kind(&());
    let mut events = pin!(events);
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                warn!(%kind, %error, "watch failed; retrying after a backoff");
                continue;
            }
        };
        let receivers = lock(&subscribers).apply(&mut writer, &store, &event);
        for receiver in receivers {
            // A failed send is a subscriber that left; `apply` forgets it
            // at the next event.
            let _ = receiver.send(event.clone()).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::ResourceExt;
    use kube::runtime::reflector::ObjectRef;

    use super::*;

    type Source = mpsc::UnboundedSender<Result<watcher::Event<ConfigMap>, watcher::Error>>;

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
    fn started() -> (SharedWatch<ConfigMap>, Source) {
        let (source, mut events) = mpsc::unbounded_channel();
        let (watch, run) = SharedWatch::new(stream::poll_fn(move |cx| events.poll_recv(cx)));
        tokio::spawn(run);
        (watch, source)
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

    /// Lets every other task run until it waits (the tests run in paused
    /// time, which only moves once every task is idle).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// An event as a short text; the objects of a listing's `InitApply`
    /// events come in no particular order, so `took` sorts within each
    /// listing.
    fn text(event: &watcher::Event<ConfigMap>) -> String {
        match event {
            watcher::Event::Init => "init".to_owned(),
            watcher::Event::InitApply(o) => format!("list {}", o.name_any()),
            watcher::Event::InitDone => "listed".to_owned(),
            watcher::Event::Apply(o) => format!("apply {}", o.name_any()),
            watcher::Event::Delete(o) => format!("delete {}", o.name_any()),
        }
    }

    /// The subscription's next item, `None` at its end; fails the test
    /// when nothing comes for a (virtual) minute.
    async fn next_of(
        subscription: &mut (impl Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin),
    ) -> Option<watcher::Event<ConfigMap>> {
        tokio::time::timeout(Duration::from_secs(60), subscription.next())
            .await
            .expect("an event or the end within a minute")
            .map(|event| event.expect("no error"))
    }

    /// The subscription's next event.
    async fn next_event(
        subscription: &mut (impl Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin),
    ) -> watcher::Event<ConfigMap> {
        next_of(subscription).await.expect("an event, not the end")
    }

    /// Takes `count` events from `subscription`.
    async fn took(
        subscription: &mut (impl Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin),
        count: usize,
    ) -> Vec<String> {
        let mut texts = Vec::new();
        let mut listing_from = None;
        for _ in 0..count {
            let event = next_event(subscription).await;
            match event {
                watcher::Event::Init => listing_from = Some(texts.len() + 1),
                watcher::Event::InitDone => {
                    if let Some(from) = listing_from.take() {
                        texts[from..].sort();
                    }
                }
                _ => {}
            }
            texts.push(text(&event));
        }
        texts
    }

    fn has(store: &Store<ConfigMap>, name: &str) -> bool {
        store.get(&ObjectRef::new(name)).is_some()
    }

    #[tokio::test(start_paused = true)]
    async fn every_subscriber_gets_every_event_after_the_store_has_it() {
        let (watch, source) = started();
        let mut first = Box::pin(watch.subscribe());
        let mut second = Box::pin(watch.subscribe());
        send(&source, listed(&["a"]));
        send(
            &source,
            [
                watcher::Event::Apply(object("b", 2)),
                watcher::Event::Delete(object("a", 3)),
            ],
        );
        let store = watch.store();
        for subscription in [&mut first, &mut second] {
            assert_eq!(took(subscription, 3).await, ["init", "list a", "listed"]);
            let applied = next_event(subscription).await;
            assert_eq!(text(&applied), "apply b");
        }
        // The fan-out may run ahead of a subscriber, never behind: by the
        // time the delete is taken, the store has it.
        let deleted = next_event(&mut first).await;
        assert_eq!(text(&deleted), "delete a");
        assert!(!has(&store, "a") && has(&store, "b"));
        assert_eq!(text(&next_event(&mut second).await), "delete a");
    }

    #[tokio::test(start_paused = true)]
    async fn the_store_is_applied_before_the_event_is_sent() {
        // `reader` takes every event and checks the store; `idle` takes
        // none, so the watch stops halfway through handing out the last
        // event: `reader` has it, `idle` has no room for it. Even that one
        // is in the store already.
        let (watch, source) = started();
        let mut reader = Box::pin(watch.subscribe());
        let _idle = watch.subscribe();
        let store = watch.store();
        send(&source, listed(&[]));
        let last = u32::try_from(EVENTS_IN_FLIGHT).unwrap();
        // Ten objects, changed in turn; resourceVersion counts the changes.
        send(
            &source,
            (0..=last).map(|i| watcher::Event::Apply(object(&format!("o{}", i % 10), i))),
        );
        assert_eq!(took(&mut reader, 2).await, ["init", "listed"]);
        let version = |o: &ConfigMap| o.resource_version().unwrap().parse::<u32>().unwrap();
        for _ in 0..=last {
            // The watch may run ahead of `reader`, never behind it.
            let taken = next_event(&mut reader).await;
            let watcher::Event::Apply(o) = taken else {
                panic!("unexpected {}", text(&taken));
            };
            let stored = store.get(&ObjectRef::from_obj(&o)).expect("in the store");
            assert!(version(&stored) >= version(&o), "{} behind", o.name_any());
        }
        settle().await;
        assert!(reader.next().now_or_never().is_none(), "the watch waits for idle");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_subscriber_starts_from_the_store_contents() {
        let (watch, source) = started();
        send(&source, listed(&["a", "b"]));
        send(&source, [watcher::Event::Apply(object("c", 2))]);
        settle().await;
        let mut late = Box::pin(watch.subscribe());
        send(
            &source,
            [
                watcher::Event::Delete(object("a", 3)),
                watcher::Event::Apply(object("d", 4)),
            ],
        );
        assert_eq!(
            took(&mut late, 7).await,
            [
                "init", "list a", "list b", "list c", "listed", "delete a", "apply d"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_joins_during_a_listing_starts_from_its_end() {
        let (watch, source) = started();
        // Before any listing.
        let mut early = Box::pin(watch.subscribe());
        settle().await;
        assert!(early.next().now_or_never().is_none(), "nothing before a listing");
        send(&source, listed(&["a"]));
        assert_eq!(took(&mut early, 3).await, ["init", "list a", "listed"]);

        // During a relist, which drops `a`.
        send(
            &source,
            [watcher::Event::Init, watcher::Event::InitApply(object("b", 2))],
        );
        settle().await;
        let mut during = Box::pin(watch.subscribe());
        settle().await;
        assert!(
            during.next().now_or_never().is_none(),
            "nothing before the relist ends"
        );
        send(
            &source,
            [
                watcher::Event::InitApply(object("c", 3)),
                watcher::Event::InitDone,
                watcher::Event::Apply(object("d", 4)),
            ],
        );
        assert_eq!(
            took(&mut during, 5).await,
            ["init", "list b", "list c", "listed", "apply d"]
        );
        // The subscriber that was there sees the relist as it came.
        assert_eq!(
            took(&mut early, 5).await,
            ["init", "list b", "list c", "listed", "apply d"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_does_not_read_holds_the_watch_back_until_it_leaves() {
        let (watch, source) = started();
        let idle = watch.subscribe();
        send(&source, listed(&[]));
        let total = EVENTS_IN_FLIGHT + 10;
        send(
            &source,
            (0..total).map(|i| watcher::Event::Apply(object(&format!("o{i}"), 1))),
        );
        settle().await;
        // The idle subscriber's room is full: one more event is in the
        // store, its send waits, and nothing after it is read.
        assert_eq!(watch.store().state().len(), EVENTS_IN_FLIGHT + 1);
        drop(idle);
        settle().await;
        assert_eq!(watch.store().state().len(), total);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_errors_are_logged_not_passed_on() {
        let (watch, source) = started();
        let mut subscription = Box::pin(watch.subscribe());
        send(&source, listed(&[]));
        source.send(Err(watcher::Error::NoResourceVersion)).unwrap();
        send(&source, [watcher::Event::Apply(object("a", 1))]);
        assert_eq!(took(&mut subscription, 3).await, ["init", "listed", "apply a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn subscriptions_end_when_the_watch_stops() {
        // The source ends: the live subscriber gets what was sent, then its
        // stream ends; one still waiting for a listing ends too.
        let (watch, source) = started();
        let mut live = Box::pin(watch.subscribe());
        send(&source, listed(&["a"]));
        settle().await;
        send(&source, [watcher::Event::Init]);
        settle().await;
        let mut waiting = Box::pin(watch.subscribe());
        drop(source);
        assert_eq!(took(&mut live, 4).await, ["init", "list a", "listed", "init"]);
        assert!(next_of(&mut live).await.is_none());
        assert!(next_of(&mut waiting).await.is_none());
        assert!(
            next_of(&mut watch.subscribe()).await.is_none(),
            "a subscriber after the end"
        );

        // The watch's future is dropped.
        let (source, mut events) = mpsc::unbounded_channel();
        let (watch, run) = SharedWatch::<ConfigMap>::new(stream::poll_fn(move |cx| events.poll_recv(cx)));
        let run = tokio::spawn(run);
        let mut live = Box::pin(watch.subscribe());
        send(&source, listed(&[]));
        assert_eq!(took(&mut live, 2).await, ["init", "listed"]);
        run.abort();
        assert!(next_of(&mut live).await.is_none());
    }

    /// Checks that a subscription is a listing followed by every later
    /// event, when every event is an Apply whose resourceVersion counts the
    /// events: the first event after the listing is the one after the
    /// newest object listed, and each next one the one after that. Returns
    /// how many events came after the listing.
    async fn gapless(
        subscription: impl Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>>,
    ) -> Result<u32, String> {
        let mut subscription = pin!(subscription);
        let version = |o: &ConfigMap| o.resource_version().unwrap().parse::<u32>().unwrap();
        let mut newest = 0;
        let mut listing = true;
        let mut after = 0;
        while let Some(event) = subscription.next().await {
            match event.unwrap() {
                watcher::Event::Init if listing => {}
                watcher::Event::InitApply(o) if listing => newest = newest.max(version(&o)),
                watcher::Event::InitDone if listing => listing = false,
                watcher::Event::Apply(o) if !listing => {
                    if version(&o) != newest + 1 {
                        return Err(format!("{} after {newest}", version(&o)));
                    }
                    newest += 1;
                    after += 1;
                }
                other => return Err(format!("unexpected {}", text(&other))),
            }
        }
        Ok(after)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_joining_while_events_flow_lose_none() {
        // Events flow while subscribers join one after another, on another
        // thread than the watch; the events stop only once all have joined.
        let (source, mut events) = mpsc::unbounded_channel();
        let (watch, run) = SharedWatch::<ConfigMap>::new(stream::poll_fn(move |cx| events.poll_recv(cx)));
        let run = tokio::spawn(run);
        let (all_joined, joined) = oneshot::channel::<()>();
        let producer = tokio::spawn(async move {
            let mut joined = joined;
            send(&source, listed(&["o0", "o1"]));
            for version in 2.. {
                send(
                    &source,
                    [watcher::Event::Apply(object(
                        &format!("o{}", version % 40),
                        version,
                    ))],
                );
                if version % 20 == 0 {
                    tokio::task::yield_now().await;
                }
                if version > 5000 && (&mut joined).now_or_never().is_some() {
                    break;
                }
            }
        });
        let mut subscribers = Vec::new();
        let store = watch.store();
        for _ in 0..40 {
            subscribers.push(tokio::spawn(gapless(watch.subscribe())));
            // Let a few events through before the next one joins.
            let seen = store.state().len();
            while store.state().len() == seen && seen < 40 {
                tokio::task::yield_now().await;
            }
            tokio::task::yield_now().await;
        }
        all_joined.send(()).unwrap();
        producer.await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the watch to end with its source")
            .unwrap();
        let mut counts = Vec::new();
        for subscriber in subscribers {
            counts.push(subscriber.await.unwrap().unwrap());
        }
        counts.dedup();
        assert!(
            counts.len() > 1,
            "subscribers joined at different events: {counts:?}"
        );
    }
}
