//! Where each AWS service's calls go.
//!
//! The SDK reads a general endpoint (`AWS_ENDPOINT_URL`, a profile's
//! `endpoint_url`) and service-specific ones (`AWS_ENDPOINT_URL_SQS`,
//! `AWS_ENDPOINT_URL_AUTO_SCALING`, `AWS_ENDPOINT_URL_EC2`, a profile's
//! `services` section). So that SQS can live on one emulator and Auto
//! Scaling on another (or, in production, each service on its own VPC
//! endpoint), a service-specific setting always beats a general one, and at
//! the same level signpost's own keys beat the SDK's:
//!
//! ```text
//!   aws.endpoints.<service>                       signpost, this service
//!   AWS_ENDPOINT_URL_<SERVICE> / profile services  SDK, this service
//!   aws.endpoint_url (--endpoint-url)             signpost, every service
//!   AWS_ENDPOINT_URL / profile endpoint_url       SDK, every service
//!   AWS's own endpoint for the region
//! ```
//!
//! The SDK alone would let a programmatic general endpoint (our
//! `aws.endpoint_url`) hide every service-specific setting, which is why
//! the choice is made here rather than by `ConfigLoader::endpoint_url`.

use std::fmt;

use aws_config::SdkConfig;
use aws_types::service_config::ServiceConfigKey;

use crate::config::{AwsConfig, ServiceEndpoints};

/// The AWS services the controller calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    AutoScaling,
    Ec2,
    Sqs,
    DynamoDb,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::AutoScaling,
        Service::Ec2,
        Service::Sqs,
        Service::DynamoDb,
    ];

    /// The SDK's service id, from which its service-specific settings are
    /// named (`AWS_ENDPOINT_URL_` + the id in upper snake case; the
    /// profile's `services` section key in lower snake case).
    fn sdk_id(self) -> &'static str {
        match self {
            Service::AutoScaling => "Auto Scaling",
            Service::Ec2 => "EC2",
            Service::Sqs => "SQS",
            Service::DynamoDb => "DynamoDB",
        }
    }

    /// The SDK's environment variable for this service's endpoint.
    pub fn env_var(self) -> &'static str {
        match self {
            Service::AutoScaling => "AWS_ENDPOINT_URL_AUTO_SCALING",
            Service::Ec2 => "AWS_ENDPOINT_URL_EC2",
            Service::Sqs => "AWS_ENDPOINT_URL_SQS",
            Service::DynamoDb => "AWS_ENDPOINT_URL_DYNAMODB",
        }
    }

    /// signpost's own endpoint for this service (`aws.endpoints.<service>`).
    fn configured(self, endpoints: &ServiceEndpoints) -> Option<&str> {
        match self {
            Service::AutoScaling => endpoints.autoscaling.as_deref(),
            Service::Ec2 => endpoints.ec2.as_deref(),
            Service::Sqs => endpoints.sqs.as_deref(),
            Service::DynamoDb => endpoints.dynamodb.as_deref(),
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sdk_id())
    }
}

/// Which setting an endpoint came from, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `aws.endpoints.<service>`.
    SignpostService,
    /// `AWS_ENDPOINT_URL_<SERVICE>` or the profile's `services` section.
    SdkService,
    /// `aws.endpoint_url` or `--endpoint-url`.
    SignpostGeneral,
}

/// What each setting says about one service's endpoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings<'a> {
    pub signpost_service: Option<&'a str>,
    pub sdk_service: Option<&'a str>,
    pub signpost_general: Option<&'a str>,
}

/// The endpoint to give the client, or `None` to leave it to the SDK's
/// general settings (and then AWS's own endpoint).
pub fn choose(s: Settings<'_>) -> Option<(&str, Source)> {
    s.signpost_service
        .map(|u| (u, Source::SignpostService))
        .or(s.sdk_service.map(|u| (u, Source::SdkService)))
        .or(s.signpost_general.map(|u| (u, Source::SignpostGeneral)))
}

/// The SDK's service-specific endpoint for `service`, if one is set.
///
/// The SDK's lookup answers with the service-specific value or, lacking
/// one, the general one, without saying which. The general one is in
/// `shared.endpoint_url()` (the loader was given no endpoint of ours), so
/// an answer that differs from it is service-specific; an equal answer is
/// service-specific only if the service's own variable is set.
fn sdk_service_endpoint(
    shared: &SdkConfig,
    service: Service,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let key = ServiceConfigKey::builder()
        .service_id(service.sdk_id())
        .env("AWS_ENDPOINT_URL")
        .profile("endpoint_url")
        .build()
        .expect("every field set");
    let found = shared.service_config()?.load_config(key)?;
    let specific = Some(found.as_str()) != shared.endpoint_url()
        || env(service.env_var()).is_some_and(|v| v == found);
    specific.then_some(found)
}

/// The endpoint chosen for each service that has one of its own or
/// signpost's general one; the rest follow the SDK's general settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Endpoints {
    chosen: Vec<(Service, String, Source)>,
}

impl Endpoints {
    /// `shared` must come from a loader that was given no endpoint.
    pub fn resolve(shared: &SdkConfig, aws: &AwsConfig) -> Endpoints {
        Endpoints::resolve_with_env(shared, aws, |name| std::env::var(name).ok())
    }

    fn resolve_with_env(
        shared: &SdkConfig,
        aws: &AwsConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Endpoints {
        let chosen = Service::ALL
            .into_iter()
            .filter_map(|service| {
                let sdk = sdk_service_endpoint(shared, service, &env);
                let settings = Settings {
                    signpost_service: service.configured(&aws.endpoints),
                    sdk_service: sdk.as_deref(),
                    signpost_general: aws.endpoint_url.as_deref(),
                };
                choose(settings).map(|(url, source)| (service, url.to_owned(), source))
            })
            .collect();
        Endpoints { chosen }
    }

    /// The endpoint chosen for `service`; `None` means the SDK's general
    /// settings apply.
    pub fn url(&self, service: Service) -> Option<&str> {
        self.chosen
            .iter()
            .find(|(s, ..)| *s == service)
            .map(|(_, url, _)| url.as_str())
    }

    /// Each chosen endpoint with the setting it came from.
    pub fn chosen(&self) -> impl Iterator<Item = (Service, &str, Source)> {
        self.chosen.iter().map(|(s, u, src)| (*s, u.as_str(), *src))
    }

    pub fn autoscaling(&self, shared: &SdkConfig) -> aws_sdk_autoscaling::Config {
        let mut b = aws_sdk_autoscaling::config::Builder::from(shared);
        if let Some(url) = self.url(Service::AutoScaling) {
            b.set_endpoint_url(Some(url.to_owned()));
        }
        b.build()
    }

    pub fn ec2(&self, shared: &SdkConfig) -> aws_sdk_ec2::Config {
        let mut b = aws_sdk_ec2::config::Builder::from(shared);
        if let Some(url) = self.url(Service::Ec2) {
            b.set_endpoint_url(Some(url.to_owned()));
        }
        b.build()
    }

    pub fn dynamodb(&self, shared: &SdkConfig) -> aws_sdk_dynamodb::config::Builder {
        let mut b = aws_sdk_dynamodb::config::Builder::from(shared);
        if let Some(url) = self.url(Service::DynamoDb) {
            b.set_endpoint_url(Some(url.to_owned()));
        }
        b
    }

    /// A builder, so that the event queue can set its long-poll timeouts.
    pub fn sqs(&self, shared: &SdkConfig) -> aws_sdk_sqs::config::Builder {
        let mut b = aws_sdk_sqs::config::Builder::from(shared);
        if let Some(url) = self.url(Service::Sqs) {
            b.set_endpoint_url(Some(url.to_owned()));
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_types::origin::Origin;
    use aws_types::service_config::LoadServiceConfig;

    /// The SDK's environment lookup for endpoint URLs: the service's own
    /// variable, else the general one.
    #[derive(Debug)]
    struct FakeEnv(Vec<(&'static str, &'static str)>);

    impl FakeEnv {
        fn get(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    impl LoadServiceConfig for FakeEnv {
        fn load_config(&self, key: ServiceConfigKey<'_>) -> Option<String> {
            let own = format!(
                "{}_{}",
                key.env(),
                key.service_id().to_uppercase().replace(' ', "_")
            );
            self.get(&own).or_else(|| self.get(key.env()))
        }
    }

    fn shared(env: &[(&'static str, &'static str)]) -> (SdkConfig, FakeEnv) {
        let fake = FakeEnv(env.to_vec());
        let mut b = SdkConfig::builder().service_config(FakeEnv(env.to_vec()));
        if let Some(general) = fake.get("AWS_ENDPOINT_URL") {
            b.insert_origin("endpoint_url", Origin::shared_environment_variable());
            b.set_endpoint_url(Some(general));
        }
        (b.build(), fake)
    }

    fn resolve(env: &[(&'static str, &'static str)], aws: &AwsConfig) -> Endpoints {
        let (shared, fake) = shared(env);
        Endpoints::resolve_with_env(&shared, aws, |n| fake.get(n))
    }

    #[test]
    fn a_service_specific_setting_beats_a_general_one_whatever_its_source() {
        let aws = AwsConfig {
            endpoint_url: Some("http://general-of-signpost".into()),
            ..AwsConfig::default()
        };
        let env = [
            ("AWS_ENDPOINT_URL", "http://general-of-sdk"),
            ("AWS_ENDPOINT_URL_SQS", "http://sqs-of-sdk"),
        ];
        let e = resolve(&env, &aws);
        assert_eq!(e.url(Service::Sqs), Some("http://sqs-of-sdk"));
        // signpost's general key beats the SDK's general variable.
        assert_eq!(
            e.url(Service::AutoScaling),
            Some("http://general-of-signpost")
        );
        assert_eq!(e.url(Service::Ec2), Some("http://general-of-signpost"));
    }

    #[test]
    fn signposts_service_key_beats_the_sdks_service_variable() {
        let mut aws = AwsConfig::default();
        aws.endpoints.sqs = Some("http://sqs-of-signpost".into());
        let env = [("AWS_ENDPOINT_URL_SQS", "http://sqs-of-sdk")];
        let e = resolve(&env, &aws);
        assert_eq!(e.url(Service::Sqs), Some("http://sqs-of-signpost"));
        assert_eq!(
            e.chosen().collect::<Vec<_>>(),
            [(
                Service::Sqs,
                "http://sqs-of-signpost",
                Source::SignpostService
            )]
        );
    }

    #[test]
    fn each_service_reads_its_own_sdk_variable() {
        let env = [
            ("AWS_ENDPOINT_URL", "http://moto"),
            ("AWS_ENDPOINT_URL_AUTO_SCALING", "http://asg"),
            ("AWS_ENDPOINT_URL_EC2", "http://ec2"),
        ];
        let e = resolve(&env, &AwsConfig::default());
        assert_eq!(e.url(Service::AutoScaling), Some("http://asg"));
        assert_eq!(e.url(Service::Ec2), Some("http://ec2"));
        // SQS has none of its own: the SDK's general variable applies,
        // which the client finds by itself.
        assert_eq!(e.url(Service::Sqs), None);
    }

    #[test]
    fn a_service_variable_equal_to_the_general_one_still_beats_signposts_general_key() {
        let aws = AwsConfig {
            endpoint_url: Some("http://general-of-signpost".into()),
            ..AwsConfig::default()
        };
        let env = [
            ("AWS_ENDPOINT_URL", "http://same"),
            ("AWS_ENDPOINT_URL_SQS", "http://same"),
        ];
        let e = resolve(&env, &aws);
        assert_eq!(e.url(Service::Sqs), Some("http://same"));
        assert_eq!(e.url(Service::Ec2), Some("http://general-of-signpost"));
    }

    #[test]
    fn nothing_set_leaves_every_service_to_the_sdk() {
        assert_eq!(resolve(&[], &AwsConfig::default()), Endpoints::default());
    }
}
