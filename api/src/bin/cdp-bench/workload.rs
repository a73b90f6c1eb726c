//! A deterministic, realistic stream of Segment messages for a web shop, generated from a seed.
//!
//! People `u-<n>` each have an anonymous id. A person's first messages (about 20 % of all) are
//! anonymous `track` calls (page views, product views) sent with the anonymous id only; then an
//! `identify` with the user id, the anonymous id and the traits email, name and plan links the
//! visitor to the person; after that come `identify` calls (about 15 % of all messages in total)
//! and `track` calls by user id (orders with revenue, product views with sku and price, cart
//! additions, checkouts, page views). Activity comes in sessions spread over 30 days, and the
//! whole stream is sorted by timestamp, so a batch holds the messages of the sessions active at
//! that moment, as a live feed would. Every message has a unique message id and an ISO timestamp.

use chrono::{DateTime, Duration, SecondsFormat, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

/// Messages per person on average.
const MESSAGES_PER_PERSON: usize = 20;
/// Share of each person's messages sent anonymously before they identify.
const ANONYMOUS_SHARE: f64 = 0.20;
/// Chance that a message after the linking identify is another identify: with the linking one
/// (1 of ~20) this makes about 15 % identify calls overall.
const LATER_IDENTIFY_CHANCE: f64 = 0.133;
/// Messages per session on average.
const MESSAGES_PER_SESSION: usize = 6;
/// The span the stream covers.
const WINDOW_DAYS: i64 = 30;

const FIRST_NAMES: [&str; 16] = [
    "Ada",
    "Grace",
    "Alan",
    "Linus",
    "Margaret",
    "Ken",
    "Barbara",
    "Dennis",
    "Frances",
    "Edsger",
    "Radia",
    "John",
    "Hedy",
    "Tim",
    "Katherine",
    "Guido",
];
const LAST_NAMES: [&str; 16] = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Torvalds",
    "Hamilton",
    "Thompson",
    "Liskov",
    "Ritchie",
    "Allen",
    "Dijkstra",
    "Perlman",
    "McCarthy",
    "Lamarr",
    "Berners-Lee",
    "Johnson",
    "van Rossum",
];
const DOMAINS: [&str; 4] = [
    "example.com",
    "example.org",
    "mail.example.net",
    "shop.example",
];
const CATEGORIES: [&str; 6] = ["Shoes", "Shirts", "Bags", "Watches", "Outdoor", "Kitchen"];
const ADJECTIVES: [&str; 8] = [
    "Classic", "Trail", "Urban", "Vintage", "Compact", "Deluxe", "Everyday", "Pro",
];
const NOUNS: [&str; 8] = [
    "Runner",
    "Tee",
    "Backpack",
    "Chronograph",
    "Jacket",
    "Kettle",
    "Sneaker",
    "Tote",
];
const PATHS: [&str; 6] = [
    "/",
    "/sale",
    "/new",
    "/search",
    "/help/shipping",
    "/blog/fall-lookbook",
];
const REFERRERS: [&str; 4] = [
    "https://www.google.com/",
    "https://news.example/",
    "",
    "https://mail.example.net/",
];
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];

/// A person of the workload.
pub struct Person {
    pub user_id: String,
    pub anonymous_id: String,
    pub email: String,
    pub name: String,
    /// The profile id the baseline gives this person (a time-ordered id, like the CDP's).
    pub profile_id: Uuid,
}

struct Product {
    sku: String,
    name: String,
    category: &'static str,
    price: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Identify,
    Track,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Identify => "identify",
            Kind::Track => "track",
        }
    }
}

/// One message, compact: the JSON is built when needed.
pub struct Message {
    pub person: u32,
    pub kind: Kind,
    /// Sends the user id (false: anonymous, with the anonymous id only).
    pub with_user_id: bool,
    /// Sends the anonymous id too (every anonymous message and the linking identify).
    pub with_anonymous_id: bool,
    /// The event name of a track call.
    pub event: Option<&'static str>,
    /// Properties of a track call, traits of an identify call.
    pub payload: Value,
    pub timestamp: DateTime<Utc>,
    pub message_id: String,
    /// Last octet of the client address in the context.
    pub ip: u8,
}

pub struct Workload {
    pub people: Vec<Person>,
    pub messages: Vec<Message>,
}

fn random_uuid(rng: &mut StdRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.gen()).into_uuid()
}

fn money(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

impl Workload {
    /// `count` messages from about `count / 20` people, the same for the same seed.
    pub fn generate(seed: u64, count: usize) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let base = Utc
            .with_ymd_and_hms(2026, 1, 5, 0, 0, 0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let window_secs = WINDOW_DAYS * 24 * 3600;

        let catalog: Vec<Product> = (0..200)
            .map(|index| Product {
                sku: format!("SKU-{index:05}"),
                name: format!(
                    "{} {}",
                    ADJECTIVES[rng.gen_range(0..ADJECTIVES.len())],
                    NOUNS[rng.gen_range(0..NOUNS.len())]
                ),
                category: CATEGORIES[rng.gen_range(0..CATEGORIES.len())],
                price: money(rng.gen_range(4.99..499.99)),
            })
            .collect();

        let people_count = count.div_ceil(MESSAGES_PER_PERSON).max(1);
        let people: Vec<Person> = (0..people_count)
            .map(|index| {
                let first = FIRST_NAMES[rng.gen_range(0..FIRST_NAMES.len())];
                let last = LAST_NAMES[rng.gen_range(0..LAST_NAMES.len())];
                let domain = DOMAINS[rng.gen_range(0..DOMAINS.len())];
                Person {
                    user_id: format!("u-{index}"),
                    anonymous_id: random_uuid(&mut rng).to_string(),
                    email: format!(
                        "{}.{}{index}@{domain}",
                        first.to_lowercase(),
                        last.to_lowercase().replace(' ', "")
                    ),
                    name: format!("{first} {last}"),
                    profile_id: Uuid::now_v7(),
                }
            })
            .collect();

        // How many messages each person sends: `count` draws, so the total is exact.
        let mut per_person = vec![0usize; people_count];
        for _ in 0..count {
            per_person[rng.gen_range(0..people_count)] += 1;
        }

        let mut messages = Vec::with_capacity(count);
        for (person, &sent) in per_person.iter().enumerate() {
            if sent == 0 {
                continue;
            }
            let person_id = person as u32;
            let details = &people[person];
            // Visitors browse anonymously, then sign up or log in (the linking identify).
            let anonymous = ((sent as f64 * ANONYMOUS_SHARE) + rng.gen::<f64>()).floor() as usize;
            let anonymous = anonymous.min(sent - 1);
            let sessions = sent.div_ceil(MESSAGES_PER_SESSION);
            let mut starts: Vec<i64> = (0..sessions)
                .map(|_| rng.gen_range(0..window_secs))
                .collect();
            starts.sort_unstable();
            let mut plan = "free";
            let mut last_at: i64 = 0;
            for index in 0..sent {
                let session = (index * sessions) / sent;
                let first_of_session = index == 0 || (index - 1) * sessions / sent != session;
                // A new session starts at its own time (never before the last message); within
                // a session, messages follow each other seconds to minutes apart.
                let at = if first_of_session {
                    starts[session].max(last_at)
                } else {
                    last_at
                } + rng.gen_range(3..240);
                last_at = at;
                let timestamp =
                    base + Duration::seconds(at) + Duration::milliseconds(rng.gen_range(0..1000));
                let ip = rng.gen_range(1..=254);
                let message_id = random_uuid(&mut rng).to_string();
                let message = if index < anonymous {
                    let (event, payload) = browse(&mut rng, &catalog);
                    Message {
                        person: person_id,
                        kind: Kind::Track,
                        with_user_id: false,
                        with_anonymous_id: true,
                        event: Some(event),
                        payload,
                        timestamp,
                        message_id,
                        ip,
                    }
                } else if index == anonymous {
                    Message {
                        person: person_id,
                        kind: Kind::Identify,
                        with_user_id: true,
                        with_anonymous_id: true,
                        event: None,
                        payload: json!({"email": details.email, "name": details.name, "plan": plan}),
                        timestamp,
                        message_id,
                        ip,
                    }
                } else if rng.gen_bool(LATER_IDENTIFY_CHANCE) {
                    if rng.gen_bool(0.3) {
                        plan = PLANS[rng.gen_range(0..PLANS.len())];
                    }
                    Message {
                        person: person_id,
                        kind: Kind::Identify,
                        with_user_id: true,
                        with_anonymous_id: false,
                        event: None,
                        payload: json!({"email": details.email, "name": details.name, "plan": plan}),
                        timestamp,
                        message_id,
                        ip,
                    }
                } else {
                    let (event, payload) = shop(&mut rng, &catalog, person, index);
                    Message {
                        person: person_id,
                        kind: Kind::Track,
                        with_user_id: true,
                        with_anonymous_id: false,
                        event: Some(event),
                        payload,
                        timestamp,
                        message_id,
                        ip,
                    }
                };
                messages.push(message);
            }
        }
        // A live feed: everything in time order (stable, so ties keep generation order).
        messages.sort_by_key(|message| message.timestamp);
        Workload { people, messages }
    }

    pub fn person(&self, message: &Message) -> &Person {
        &self.people[message.person as usize]
    }

    /// The context a server-side library sends.
    pub fn context(message: &Message) -> Value {
        json!({
            "library": {"name": "analytics-node", "version": "2.1.2"},
            "ip": format!("203.0.113.{}", message.ip),
        })
    }

    /// The message as a Segment client sends it.
    pub fn to_json(&self, message: &Message) -> Value {
        let person = self.person(message);
        let mut object = serde_json::Map::new();
        object.insert("type".to_owned(), json!(message.kind.as_str()));
        if message.with_user_id {
            object.insert("userId".to_owned(), json!(person.user_id));
        }
        if message.with_anonymous_id {
            object.insert("anonymousId".to_owned(), json!(person.anonymous_id));
        }
        match message.kind {
            Kind::Identify => {
                object.insert("traits".to_owned(), message.payload.clone());
            }
            Kind::Track => {
                object.insert("event".to_owned(), json!(message.event));
                object.insert("properties".to_owned(), message.payload.clone());
            }
        }
        object.insert(
            "timestamp".to_owned(),
            json!(message
                .timestamp
                .to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        object.insert("messageId".to_owned(), json!(message.message_id));
        object.insert("context".to_owned(), Workload::context(message));
        Value::Object(object)
    }

    /// The bodies of `POST /v1/batch`, `size` messages each, with their message counts.
    pub fn request_bodies(&self, size: usize) -> anyhow::Result<Vec<(usize, Vec<u8>)>> {
        self.messages
            .chunks(size)
            .map(|chunk| {
                let batch: Vec<Value> = chunk.iter().map(|message| self.to_json(message)).collect();
                Ok((chunk.len(), serde_json::to_vec(&json!({ "batch": batch }))?))
            })
            .collect()
    }
}

/// An anonymous visitor's event: a page view or a product view.
fn browse(rng: &mut StdRng, catalog: &[Product]) -> (&'static str, Value) {
    if rng.gen_bool(0.55) {
        let path = PATHS[rng.gen_range(0..PATHS.len())];
        (
            "Page Viewed",
            json!({
                "path": path,
                "url": format!("https://shop.example{path}"),
                "title": "Shop Example",
                "referrer": REFERRERS[rng.gen_range(0..REFERRERS.len())],
            }),
        )
    } else {
        ("Product Viewed", product_view(rng, catalog))
    }
}

fn product_view(rng: &mut StdRng, catalog: &[Product]) -> Value {
    let product = &catalog[rng.gen_range(0..catalog.len())];
    json!({
        "product_id": product.sku,
        "sku": product.sku,
        "name": product.name,
        "category": product.category,
        "price": product.price,
        "currency": "USD",
    })
}

/// A known customer's event.
fn shop(
    rng: &mut StdRng,
    catalog: &[Product],
    person: usize,
    index: usize,
) -> (&'static str, Value) {
    let roll: f64 = rng.gen();
    if roll < 0.15 {
        let items = rng.gen_range(1..=3);
        let mut revenue = 0.0;
        let products: Vec<Value> = (0..items)
            .map(|_| {
                let product = &catalog[rng.gen_range(0..catalog.len())];
                let quantity = rng.gen_range(1..=2);
                revenue += product.price * f64::from(quantity);
                json!({"sku": product.sku, "name": product.name, "price": product.price, "quantity": quantity})
            })
            .collect();
        (
            "Order Completed",
            json!({
                "order_id": format!("o-{person}-{index}"),
                "revenue": money(revenue),
                "currency": "USD",
                "products": products,
            }),
        )
    } else if roll < 0.50 {
        ("Product Viewed", product_view(rng, catalog))
    } else if roll < 0.70 {
        let product = &catalog[rng.gen_range(0..catalog.len())];
        (
            "Product Added",
            json!({"sku": product.sku, "name": product.name, "price": product.price, "quantity": 1, "currency": "USD"}),
        )
    } else if roll < 0.80 {
        (
            "Checkout Started",
            json!({"value": money(rng.gen_range(10.0..600.0)), "currency": "USD"}),
        )
    } else {
        let path = PATHS[rng.gen_range(0..PATHS.len())];
        (
            "Page Viewed",
            json!({"path": path, "url": format!("https://shop.example{path}"), "title": "Shop Example"}),
        )
    }
}
