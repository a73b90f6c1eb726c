//! Campaigns over real HTTP and SMTP on both databases: triggers (segment entry, stage, event,
//! broadcast), rendered templates, consent and suppression, one email per (campaign, profile),
//! the frequency cap, one-click unsubscribe, template validation and header injection.

use serde_json::{json, Value};

use crate::support::*;

const CAMPAIGN_FIELDS: &str = "id name status subject consentPurpose trigger { kind segmentId stage event } stats { queued sent failed suppressed }";
const DELIVERIES: &str = "query($c: ID) { emailDeliveries(campaignId: $c, first: 100) { totalCount edges { node { id campaignId profileId to status suppressionReason attempts lastError sentAt } } } }";

struct Env {
    server: TestServer,
    owner: Session,
    key: String,
    smtp: SmtpSink,
}

async fn setup(backend: Backend, name: &str) -> Env {
    init_logs();
    let smtp = SmtpSink::start().await;
    let server = TestServer::start(backend, &smtp).await;
    let owner = new_tenant(
        &server,
        &smtp,
        &slug(name),
        &format!("owner@{name}.example"),
    )
    .await;
    let key = write_key(&server, &owner, name, "SERVER").await;
    Env {
        server,
        owner,
        key,
        smtp,
    }
}

/// An identify message; `consent` sets the email_marketing consent when given.
fn identify(user: &str, traits: Value, consent: Option<bool>) -> Value {
    let mut message = json!({"type": "identify", "userId": user, "traits": traits,
        "messageId": uuid::Uuid::new_v4().to_string()});
    if let Some(granted) = consent {
        message["context"] =
            json!({"consent": {"categoryPreferences": {"email_marketing": granted}}});
    }
    message
}

fn track(user: &str, event: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event,
        "messageId": uuid::Uuid::new_v4().to_string()})
}

impl Env {
    fn token(&self) -> Option<&str> {
        Some(&self.owner.access_token)
    }

    async fn send(&self, messages: Value) {
        let (status, body) = collect(
            &self.server,
            "/v1/batch",
            &self.key,
            &json!({ "batch": messages }),
        )
        .await;
        assert_eq!(
            (status, body),
            (200, json!({"success": true})),
            "[{:?}]",
            self.server.backend
        );
    }

    async fn segment(&self, name: &str, condition: Value) -> String {
        let data = self
            .server
            .gql_ok(
                self.token(),
                "mutation($input: SegmentInput!) { createSegment(input: $input) { id status } }",
                json!({"input": {"name": name, "condition": condition}}),
            )
            .await;
        assert_eq!(data["createSegment"]["status"], "READY");
        data["createSegment"]["id"].as_str().unwrap().to_owned()
    }

    async fn create_campaign(&self, input: Value) -> Value {
        self.server
            .gql(
                self.token(),
                &format!("mutation($input: CampaignInput!) {{ createCampaign(input: $input) {{ {CAMPAIGN_FIELDS} }} }}"),
                json!({"input": input}),
            )
            .await
    }

    /// Creates and activates a campaign; returns its id.
    async fn active_campaign(
        &self,
        name: &str,
        trigger: Value,
        subject: &str,
        text: &str,
    ) -> String {
        let response = self
            .create_campaign(
                json!({"name": name, "trigger": trigger, "subject": subject, "textBody": text}),
            )
            .await;
        assert!(response.get("errors").is_none(), "{response:#}");
        assert_eq!(response["data"]["createCampaign"]["status"], "DRAFT");
        let id = response["data"]["createCampaign"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.set_status(&id, "ACTIVE").await;
        id
    }

    async fn set_status(&self, id: &str, status: &str) -> Value {
        let data = self
            .server
            .gql_ok(
                self.token(),
                &format!("mutation($id: ID!, $s: CampaignStatus!) {{ setCampaignStatus(id: $id, status: $s) {{ {CAMPAIGN_FIELDS} }} }}"),
                json!({"id": id, "s": status}),
            )
            .await;
        assert_eq!(data["setCampaignStatus"]["status"], status);
        data["setCampaignStatus"].clone()
    }

    async fn deliveries(&self, campaign_id: &str) -> Vec<Value> {
        self.deliveries_as(self.token(), campaign_id).await
    }

    async fn deliveries_as(&self, token: Option<&str>, campaign_id: &str) -> Vec<Value> {
        let data = self
            .server
            .gql_ok(token, DELIVERIES, json!({"c": campaign_id}))
            .await;
        data["emailDeliveries"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| edge["node"].clone())
            .collect()
    }

    async fn stats(&self, campaign_id: &str) -> Value {
        let data = self
            .server
            .gql_ok(
                self.token(),
                &format!("query($id: ID!) {{ campaign(id: $id) {{ {CAMPAIGN_FIELDS} }} }}"),
                json!({"id": campaign_id}),
            )
            .await;
        data["campaign"]["stats"].clone()
    }

    async fn profile_id(&self, user: &str) -> String {
        profile_by(&self.server, &self.owner.access_token, "user_id", user).await["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Waits until `count` emails arrived in total and returns them all.
    async fn mails(&self, count: usize) -> Vec<ReceivedMail> {
        let mails = self.smtp.wait_for(count, WAIT).await;
        assert!(
            mails.len() >= count,
            "[{:?}] expected {count} emails, got {}",
            self.server.backend,
            mails.len()
        );
        mails
    }
}

fn status_of(deliveries: &[Value], profile_id: &str) -> (String, Value) {
    let delivery = deliveries
        .iter()
        .find(|delivery| delivery["profileId"] == profile_id)
        .unwrap_or_else(|| panic!("no delivery for {profile_id} in {deliveries:#?}"));
    (
        delivery["status"].as_str().unwrap().to_owned(),
        delivery["suppressionReason"].clone(),
    )
}

#[tokio::test]
async fn a_segment_entry_sends_the_rendered_email_and_one_click_unsubscribe_withdraws_consent() {
    for backend in backends() {
        let env = setup(backend, "camp").await;
        let pro = env
            .segment("Pro", json!({"trait": "plan", "op": "eq", "value": "pro"}))
            .await;
        let response = env
            .create_campaign(json!({
                "name": "Welcome pro",
                "trigger": {"segmentEntered": pro},
                "subject": "Hi {{ profile.traits.firstName }}",
                "textBody": "Hello {{ profile.traits.firstName }}{{ profile.traits.missing }}{{ profile.traits.missing.deeper }}! Leave: {{ unsubscribe_url }}",
                "htmlBody": "<p>Hello {{ profile.traits.firstName }}</p><a href=\"{{ unsubscribe_url }}\">leave</a>",
            }))
            .await;
        assert!(response.get("errors").is_none(), "{response:#}");
        let campaign = &response["data"]["createCampaign"];
        assert_eq!(campaign["consentPurpose"], "email_marketing");
        assert_eq!(campaign["trigger"]["kind"], "segmentEntered");
        assert_eq!(campaign["trigger"]["segmentId"], pro.as_str());
        let campaign_id = campaign["id"].as_str().unwrap().to_owned();

        // Nothing is sent while the campaign is a draft.
        env.send(json!([identify(
            "early",
            json!({"email": "early@example.com", "plan": "pro"}),
            Some(true)
        )]))
        .await;
        assert!(env.deliveries(&campaign_id).await.is_empty());
        env.set_status(&campaign_id, "ACTIVE").await;

        let before = env.smtp.received().len();
        env.send(json!([identify(
            "ann",
            json!({"email": "ann@example.com", "firstName": "<Ann & Co>", "plan": "pro"}),
            Some(true)
        )]))
        .await;
        let mail = mail_to(&env.smtp, before + 1, "ann@example.com").await;
        assert_eq!(
            mail.decoded_header("Subject").unwrap(),
            "Hi <Ann & Co>",
            "[{backend:?}]"
        );
        let text = mail.text();
        assert!(
            text.contains("Hello <Ann & Co>! Leave: http://cdp.test/unsubscribe?token="),
            "{text}"
        );
        assert!(text.contains("<p>Hello &lt;Ann &amp; Co&gt;</p>"), "{text}");
        let token = token_from_link(&text, "/unsubscribe");
        let link = format!("http://cdp.test/unsubscribe?token={token}");
        assert_eq!(
            mail.header("List-Unsubscribe").unwrap(),
            format!("<{link}>")
        );
        assert_eq!(
            mail.header("List-Unsubscribe-Post").unwrap(),
            "List-Unsubscribe=One-Click"
        );
        let ann = env.profile_id("ann").await;
        let deliveries = env.deliveries(&campaign_id).await;
        assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
        assert_eq!(deliveries[0]["profileId"], ann.as_str());
        assert_eq!(deliveries[0]["to"], "ann@example.com");

        // GET shows a confirmation page and changes nothing.
        let url = env.server.url(&format!("/unsubscribe?token={token}"));
        let page = env.server.client.get(&url).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(html.contains("<form method=\"post\""), "{html}");
        let consents = profile_by(&env.server, &env.owner.access_token, "user_id", "ann").await
            ["consents"]
            .clone();
        assert_eq!(
            consents,
            json!([{"purpose": "email_marketing", "granted": true}])
        );

        // The one-click POST withdraws the consent, and again changes nothing more.
        for _ in 0..2 {
            let response = env
                .server
                .client
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("List-Unsubscribe=One-Click")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        let consents = profile_by(&env.server, &env.owner.access_token, "user_id", "ann").await
            ["consents"]
            .clone();
        assert_eq!(
            consents,
            json!([{"purpose": "email_marketing", "granted": false}])
        );

        // A bad token is refused with the contract's error body.
        let mut forged = token.clone().into_bytes();
        let last = forged.len() - 3;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        for response in [
            env.server
                .client
                .post(env.server.url(&format!("/unsubscribe?token={forged}")))
                .body("List-Unsubscribe=One-Click")
                .send()
                .await
                .unwrap(),
            env.server
                .client
                .get(env.server.url("/unsubscribe?token=garbage"))
                .send()
                .await
                .unwrap(),
        ] {
            assert_eq!(response.status(), 400);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["code"], "BAD_USER_INPUT");
            assert!(body["message"].is_string());
        }

        // A later trigger for the unsubscribed profile is suppressed.
        let bought = env
            .active_campaign(
                "Thanks",
                json!({"event": "Order Completed"}),
                "Thanks",
                "Thanks!",
            )
            .await;
        env.send(json!([track("ann", "Order Completed")])).await;
        let deliveries = env.deliveries(&bought).await;
        assert_eq!(
            status_of(&deliveries, &ann),
            ("SUPPRESSED".to_owned(), json!("no consent"))
        );
        env.stop_and_check_count(before + 1).await;
    }
}

impl Env {
    /// Stops the server (its workers finish what they claimed) and checks the total emails.
    async fn stop_and_check_count(self, expected: usize) {
        let backend = self.server.backend;
        self.server.stop().await;
        assert_eq!(self.smtp.received().len(), expected, "[{backend:?}]");
    }
}

#[tokio::test]
async fn without_consent_or_email_nothing_is_sent_and_re_entering_sends_nothing_twice() {
    for backend in backends() {
        let env = setup(backend, "suppress").await;
        let pro = env
            .segment("Pro", json!({"trait": "plan", "op": "eq", "value": "pro"}))
            .await;
        let campaign = env
            .active_campaign("Pro", json!({"segmentEntered": pro}), "Pro", "Welcome")
            .await;
        let before = env.smtp.received().len();
        env.send(json!([
            identify(
                "yes",
                json!({"email": "yes@example.com", "plan": "pro"}),
                Some(true)
            ),
            identify(
                "no",
                json!({"email": "no@example.com", "plan": "pro"}),
                None
            ),
            identify(
                "mute",
                json!({"email": "mute@example.com", "plan": "pro"}),
                Some(false)
            ),
            identify("nomail", json!({"plan": "pro"}), Some(true)),
        ]))
        .await;
        let deliveries = env.deliveries(&campaign).await;
        assert_eq!(deliveries.len(), 4, "{deliveries:#?}");
        let (yes, no, mute, nomail) = (
            env.profile_id("yes").await,
            env.profile_id("no").await,
            env.profile_id("mute").await,
            env.profile_id("nomail").await,
        );
        assert_eq!(
            status_of(&deliveries, &no),
            ("SUPPRESSED".to_owned(), json!("no consent"))
        );
        assert_eq!(
            status_of(&deliveries, &mute),
            ("SUPPRESSED".to_owned(), json!("no consent"))
        );
        assert_eq!(
            status_of(&deliveries, &nomail),
            ("SUPPRESSED".to_owned(), json!("no email"))
        );
        mail_to(&env.smtp, before + 1, "yes@example.com").await;

        // Leaving and entering again sends nothing twice.
        env.send(json!([identify("yes", json!({"plan": "free"}), None)]))
            .await;
        env.send(json!([identify("yes", json!({"plan": "pro"}), None)]))
            .await;
        // A suppressed decision is taken again: consent granted since, the email goes out.
        env.send(json!([identify("no", json!({"plan": "free"}), Some(true))]))
            .await;
        env.send(json!([identify("no", json!({"plan": "pro"}), None)]))
            .await;
        let mails = env.mails(before + 2).await;
        assert!(mails[before + 1].to.contains(&"no@example.com".to_owned()));
        let deliveries = env.deliveries(&campaign).await;
        assert_eq!(deliveries.len(), 4);
        assert_eq!(status_of(&deliveries, &yes).0, "SENT");
        let stats = env.stats(&campaign).await;
        assert_eq!(
            stats["sent"].as_i64().unwrap() + stats["queued"].as_i64().unwrap(),
            2
        );
        assert_eq!(stats["suppressed"], 2);
        assert_eq!(stats["failed"], 0);

        // Without PII_READ the address is masked.
        let analyst = invited_user(
            &env.server,
            &env.smtp,
            &env.owner,
            "analyst@suppress.example",
            &["analyst"],
        )
        .await;
        let masked = env
            .deliveries_as(Some(&analyst.access_token), &campaign)
            .await;
        let shown = masked
            .iter()
            .find(|delivery| delivery["profileId"] == yes.as_str())
            .unwrap()["to"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(shown, "yes@example.com");
        assert!(shown.contains("***"), "{shown}");
        // Only CAMPAIGNS_MANAGE changes campaigns.
        let response = env
            .server
            .gql(
                Some(&analyst.access_token),
                "mutation($id: ID!) { setCampaignStatus(id: $id, status: PAUSED) { id } }",
                json!({"id": campaign}),
            )
            .await;
        assert_eq!(error_code(&response), "FORBIDDEN");
        // The invitation was the third email.
        env.stop_and_check_count(before + 3).await;
    }
}

#[tokio::test]
async fn an_event_and_a_stage_entry_trigger_their_campaigns() {
    for backend in backends() {
        let env = setup(backend, "trig").await;
        env.server
            .gql_ok(
                env.token(),
                "mutation($s: [LifecycleStageInput!]!) { setLifecycleModel(stages: $s) { key } }",
                json!({"s": [
                    {"key": "paying", "name": "Paying", "condition": {"trait": "plan", "op": "eq", "value": "pro"}},
                    {"key": "trying", "name": "Trying", "condition": {"trait": "plan", "op": "exists"}},
                ]}),
            )
            .await;
        let stage = env
            .active_campaign(
                "Paying",
                json!({"stageEntered": "paying"}),
                "Welcome aboard {{ profile.traits.firstName }}",
                "You pay now.",
            )
            .await;
        let event = env
            .active_campaign(
                "Cart",
                json!({"event": "Cart Abandoned"}),
                "Forgot something?",
                "Your cart, {{ profile.traits.firstName }}.",
            )
            .await;
        let before = env.smtp.received().len();
        env.send(json!([identify(
            "bo",
            json!({"email": "bo@example.com", "firstName": "Bo", "plan": "free"}),
            Some(true)
        )]))
        .await;
        assert!(
            env.deliveries(&stage).await.is_empty(),
            "trying is not paying"
        );
        env.send(json!([track("bo", "Cart Abandoned")])).await;
        let mail = mail_to(&env.smtp, before + 1, "bo@example.com").await;
        assert_eq!(mail.decoded_header("Subject").unwrap(), "Forgot something?");
        assert!(mail.text().contains("Your cart, Bo."));
        env.send(json!([identify("bo", json!({"plan": "pro"}), None)]))
            .await;
        let mails = env.mails(before + 2).await;
        assert_eq!(
            mails[before + 1].decoded_header("Subject").unwrap(),
            "Welcome aboard Bo"
        );
        // The same event again: one email per (campaign, profile).
        env.send(json!([track("bo", "Cart Abandoned")])).await;
        assert_eq!(env.deliveries(&event).await.len(), 1);
        assert_eq!(env.deliveries(&stage).await.len(), 1);
        env.stop_and_check_count(before + 2).await;
    }
}

#[tokio::test]
async fn a_broadcast_emails_every_current_member_once() {
    for backend in backends() {
        let env = setup(backend, "cast").await;
        let mut batch = Vec::new();
        for n in 0..6 {
            batch.push(identify(
                &format!("m{n}"),
                json!({"email": format!("m{n}@example.com"), "plan": "pro", "n": n}),
                Some(n != 5),
            ));
        }
        batch.push(identify(
            "out",
            json!({"email": "out@example.com", "plan": "free"}),
            Some(true),
        ));
        env.send(Value::Array(batch)).await;
        let pro = env
            .segment("Pro", json!({"trait": "plan", "op": "eq", "value": "pro"}))
            .await;
        let before = env.smtp.received().len();
        let campaign = env
            .active_campaign(
                "News",
                json!({"broadcastSegment": pro}),
                "News #{{ profile.traits.n }}",
                "News for you",
            )
            .await;
        // Queued in setCampaignStatus's transaction.
        let deliveries = env.deliveries(&campaign).await;
        assert_eq!(deliveries.len(), 6, "{deliveries:#?}");
        let mails = env.mails(before + 5).await;
        let mut subjects: Vec<String> = mails[before..]
            .iter()
            .map(|mail| mail.decoded_header("Subject").unwrap())
            .collect();
        subjects.sort();
        assert_eq!(
            subjects,
            ["News #0", "News #1", "News #2", "News #3", "News #4"]
        );
        assert!(mails
            .iter()
            .all(|mail| !mail.to.contains(&"out@example.com".to_owned())));
        let stats = env.stats(&campaign).await;
        assert_eq!(stats["suppressed"], 1);

        // Pausing and activating again queues nothing twice.
        env.set_status(&campaign, "PAUSED").await;
        env.set_status(&campaign, "ACTIVE").await;
        assert_eq!(env.deliveries(&campaign).await.len(), 6);
        env.stop_and_check_count(before + 5).await;
    }
}

#[tokio::test]
async fn bad_templates_and_line_breaks_in_subjects_are_refused() {
    for backend in backends() {
        let env = setup(backend, "tmpl").await;
        let cases = [
            (
                json!({"subject": "Hi {{ profile.traits.name", "textBody": "x"}),
                "input.subject",
            ),
            (
                json!({"subject": "Hi", "textBody": "{% if %}"}),
                "input.textBody",
            ),
            (
                json!({"subject": "Hi", "textBody": "x", "htmlBody": "{{ x | no_such_filter }}"}),
                "input.htmlBody",
            ),
            (
                json!({"subject": "Hi\r\nBcc: victim@example.com", "textBody": "x"}),
                "input.subject",
            ),
            (
                json!({"subject": "Hi\nthere", "textBody": "x"}),
                "input.subject",
            ),
        ];
        for (fields, field) in cases {
            let mut input = json!({"name": "Bad", "trigger": {"event": "x"}});
            for (key, value) in fields.as_object().unwrap() {
                input[key] = value.clone();
            }
            let response = env.create_campaign(input).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response:#}");
            assert_eq!(
                response["errors"][0]["extensions"]["field"], field,
                "{response:#}"
            );
        }
        let response = env
            .create_campaign(json!({"name": "Two", "trigger": {"event": "x", "stageEntered": "y"}, "subject": "s", "textBody": "t"}))
            .await;
        assert_eq!(
            response["errors"][0]["extensions"]["field"],
            "input.trigger"
        );

        // A trait with a line break cannot inject a header: the subject is rendered on one line.
        let campaign = env
            .active_campaign(
                "Inject",
                json!({"event": "Poke"}),
                "Hello {{ profile.traits.name }}",
                "Body",
            )
            .await;
        let before = env.smtp.received().len();
        env.send(json!([
            identify(
                "eve",
                json!({"email": "eve@example.com", "name": "Eve\r\nBcc: victim@example.com"}),
                Some(true)
            ),
            track("eve", "Poke"),
        ]))
        .await;
        let mail = mail_to(&env.smtp, before + 1, "eve@example.com").await;
        assert_eq!(mail.to, vec!["eve@example.com".to_owned()]);
        assert!(mail.header("Bcc").is_none());
        assert_eq!(
            mail.decoded_header("Subject").unwrap(),
            "Hello Eve Bcc: victim@example.com"
        );

        // An active campaign cannot be edited; a paused one can.
        let update = "mutation($id: ID!, $input: CampaignInput!) { updateCampaign(id: $id, input: $input) { status subject } }";
        let input = json!({"name": "Inject", "trigger": {"event": "Poke"}, "subject": "Hello again", "textBody": "Body"});
        let response = env
            .server
            .gql(env.token(), update, json!({"id": campaign, "input": input}))
            .await;
        assert_eq!(error_code(&response), "CONFLICT");
        env.set_status(&campaign, "PAUSED").await;
        let data = env
            .server
            .gql_ok(env.token(), update, json!({"id": campaign, "input": input}))
            .await;
        assert_eq!(
            data["updateCampaign"],
            json!({"status": "PAUSED", "subject": "Hello again"})
        );
        let response = env
            .server
            .gql(
                env.token(),
                "mutation($id: ID!) { setCampaignStatus(id: $id, status: DRAFT) { id } }",
                json!({"id": campaign}),
            )
            .await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT");
        env.stop_and_check_count(before + 1).await;
    }
}

#[tokio::test]
async fn the_frequency_cap_suppresses_campaign_emails_over_it() {
    for backend in backends() {
        let env = setup(backend, "cap").await;
        let data = env
            .server
            .gql_ok(
                env.token(),
                "mutation { updateCampaignSettings(input: {dailyCapPerProfile: 1}) { dailyCapPerProfile } }",
                json!({}),
            )
            .await;
        assert_eq!(data["updateCampaignSettings"]["dailyCapPerProfile"], 1);
        let first = env
            .active_campaign("First", json!({"event": "A"}), "A", "A")
            .await;
        let second = env
            .active_campaign("Second", json!({"event": "B"}), "B", "B")
            .await;
        env.send(json!([
            identify("cy", json!({"email": "cy@example.com"}), Some(true)),
            track("cy", "A"),
        ]))
        .await;
        env.send(json!([track("cy", "B")])).await;
        let cy = env.profile_id("cy").await;
        assert_eq!(status_of(&env.deliveries(&first).await, &cy).1, Value::Null);
        assert_eq!(
            status_of(&env.deliveries(&second).await, &cy),
            ("SUPPRESSED".to_owned(), json!("frequency cap"))
        );
        let before = env.smtp.received().len();
        mail_to(&env.smtp, before.max(2), "cy@example.com").await;
        env.stop_and_check_count(2).await;
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next protocol message other than a ping or pong, within the deadline.
async fn next(socket: &mut Socket) -> Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a message in time")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] != "ping" && value["type"] != "pong" {
                return value;
            }
        }
    }
}

#[tokio::test]
async fn a_subscriber_sees_a_campaign_email_queued_and_then_sent() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    for backend in backends() {
        let env = setup(backend, "live").await;
        let campaign = env
            .active_campaign("Ping", json!({"event": "Ping"}), "Pong", "Pong")
            .await;
        let mut request = env
            .server
            .url("/graphql/ws")
            .replace("http://", "ws://")
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let init = json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", env.owner.access_token)}});
        socket.send(Message::text(init.to_string())).await.unwrap();
        assert_eq!(next(&mut socket).await["type"], "connection_ack");
        let subscribe = json!({"type": "subscribe", "id": "1", "payload": {
            "query": "subscription($c: ID) { emailDeliveryUpdated(campaignId: $c) { id campaignId to status } }",
            "variables": {"c": campaign}}});
        socket
            .send(Message::text(subscribe.to_string()))
            .await
            .unwrap();
        let tenant_id = domain::TenantId(env.owner.tenant_id.parse().unwrap());
        let realtime = env.server.app.as_ref().unwrap().state().realtime.clone();
        tokio::time::timeout(WAIT, realtime.wait_for_subscriptions(tenant_id, 1))
            .await
            .expect("the subscription starts in time");

        env.send(json!([
            identify("li", json!({"email": "li@example.com"}), Some(true)),
            track("li", "Ping"),
        ]))
        .await;
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let message = next(&mut socket).await;
            assert_eq!(message["type"], "next", "{message:#}");
            let delivery = &message["payload"]["data"]["emailDeliveryUpdated"];
            assert_eq!(delivery["campaignId"], campaign.as_str());
            assert_eq!(delivery["to"], "li@example.com");
            statuses.push(delivery["status"].as_str().unwrap().to_owned());
        }
        statuses.sort();
        assert_eq!(statuses, ["QUEUED", "SENT"], "[{backend:?}]");
        drop(socket);
        env.server.stop().await;
    }
}

/// Ingestion keeps the tenant's definitions (segments, lifecycle model, campaigns) between
/// batches, keyed by a version the database raises with every change: each change made between
/// two batches must be in force for the second one.
#[tokio::test]
async fn definitions_changed_between_batches_are_in_force_for_the_next_batch() {
    for backend in backends() {
        let env = setup(backend, "defs").await;
        let state = |user: &'static str| {
            let env = &env;
            async move {
                let id = env.profile_id(user).await;
                env.server
                    .gql_ok(
                        env.token(),
                        "query($id: ID!) { profile(id: $id) { stage segments { name } } }",
                        json!({"id": id}),
                    )
                    .await["profile"]
                    .clone()
            }
        };
        // A batch with nothing defined yet: the definitions of that version are now held.
        env.send(json!([identify(
            "al",
            json!({"email": "al@example.com", "plan": "free"}),
            Some(true)
        )]))
        .await;
        assert_eq!(state("al").await["segments"], json!([]), "[{backend:?}]");

        // A segment, a lifecycle model and an active campaign, each created between batches.
        env.segment(
            "Gold",
            json!({"trait": "plan", "op": "eq", "value": "gold"}),
        )
        .await;
        env.server
            .gql_ok(
                env.token(),
                "mutation($s: [LifecycleStageInput!]!) { setLifecycleModel(stages: $s) { key } }",
                json!({"s": [{"key": "vip", "name": "VIP",
                              "condition": {"trait": "plan", "op": "eq", "value": "gold"}}]}),
            )
            .await;
        let campaign = env
            .active_campaign("Cart", json!({"event": "Cart Abandoned"}), "Cart", "Yours.")
            .await;
        let before = env.smtp.received().len();
        env.send(json!([
            identify("al", json!({"plan": "gold"}), None),
            track("al", "Cart Abandoned")
        ]))
        .await;
        assert_eq!(
            state("al").await,
            json!({"stage": "vip", "segments": [{"name": "Gold"}]}),
            "[{backend:?}]"
        );
        mail_to(&env.smtp, before + 1, "al@example.com").await;

        // Paused between batches: the next batch's event sends nothing.
        env.set_status(&campaign, "PAUSED").await;
        env.send(json!([
            identify("bo", json!({"email": "bo@example.com"}), Some(true)),
            track("bo", "Cart Abandoned")
        ]))
        .await;
        let bo = env.profile_id("bo").await;
        assert!(
            env.deliveries(&campaign)
                .await
                .iter()
                .all(|delivery| delivery["profileId"] != bo.as_str()),
            "[{backend:?}] a paused campaign sent"
        );
        env.stop_and_check_count(before + 1).await;
    }
}
