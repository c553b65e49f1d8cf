//! Where the archive lives: a local directory (`storage.data_dir`) or an S3
//! bucket and prefix (`storage.archive_url = "s3://BUCKET/PREFIX"`, any
//! S3-compatible server). The writer, the jobs and DataFusion all go through
//! one [`ArchiveLocation`], so the layout is the same on both.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::SessionContext;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::multipart::MultipartStore;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

use super::SinkError;
use crate::config::{ConfigError, StorageConfig};

/// An S3 bucket holding the archive under `prefix`.
#[derive(Debug, Clone)]
pub(crate) struct S3Location {
    pub bucket: String,
    /// Key prefix without leading or trailing '/'; may be empty.
    pub prefix: String,
    /// The bucket store (keys include the prefix): multipart uploads and DataFusion.
    pub bucket_store: Arc<AmazonS3>,
    /// The bucket's URL (as object_store addresses it) and region, for the
    /// one call object_store lacks: ListMultipartUploads.
    bucket_url: String,
    region: String,
    allow_http: bool,
}

/// One multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upload {
    /// Full object key (with the prefix).
    pub key: String,
    pub id: String,
}

impl S3Location {
    /// The full object key of an archive-relative path.
    pub(crate) fn key(&self, rel: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(rel)
        } else {
            object_store::path::Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    pub(crate) fn multipart(&self) -> Arc<dyn MultipartStore> {
        self.bucket_store.clone()
    }

    /// The multipart uploads in progress under the archive-relative `rel`
    /// prefix (S3 ListMultipartUploads, signed with the store's credentials,
    /// all pages).
    pub(crate) async fn list_uploads(&self, rel: &str) -> Result<Vec<Upload>, object_store::Error> {
        use object_store::client::{HttpConnector, HttpRequestBody, ReqwestConnector};
        let generic = |e: String| object_store::Error::Generic {
            store: "S3",
            source: e.into(),
        };
        let client = ReqwestConnector::default()
            .connect(&object_store::ClientOptions::new().with_allow_http(self.allow_http))?;
        let credential = self.bucket_store.credentials().get_credential().await?;
        let prefix = self.key(rel).to_string() + "/";
        let mut out = Vec::new();
        let mut marker: Option<(String, String)> = None;
        for _page in 0..10_000 {
            let mut query = format!("uploads=&prefix={}", encode(&prefix));
            if let Some((k, u)) = &marker {
                query.push_str(&format!(
                    "&key-marker={}&upload-id-marker={}",
                    encode(k),
                    encode(u)
                ));
            }
            let url = format!("{}?{query}", self.bucket_url.trim_end_matches('/'));
            let mut request = http::Request::builder()
                .method("GET")
                .uri(&url)
                .body(HttpRequestBody::empty())
                .map_err(|e| generic(format!("{url}: {e}")))?;
            object_store::aws::AwsAuthorizer::new(&credential, "s3", &self.region)
                .authorize(&mut request, None);
            let response = client
                .execute(request)
                .await
                .map_err(|e| generic(format!("ListMultipartUploads: {e}")))?;
            let status = response.status();
            let body = response
                .into_body()
                .bytes()
                .await
                .map_err(|e| generic(format!("ListMultipartUploads: {e}")))?;
            let body = String::from_utf8_lossy(&body);
            if !status.is_success() {
                return Err(generic(format!(
                    "ListMultipartUploads {url}: {status}: {body}"
                )));
            }
            let (uploads, next) = parse_uploads(&body);
            out.extend(uploads);
            match next {
                Some(n) => marker = Some(n),
                None => return Ok(out),
            }
        }
        Err(generic("ListMultipartUploads: too many pages".into()))
    }
}

/// S3's URI encoding: unreserved characters as they are, the rest as %XX.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn xml_text<'a>(block: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = block.find(&open)? + open.len();
    let len = block[start..].find(&format!("</{tag}>"))?;
    Some(&block[start..start + len])
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The uploads of a ListMultipartUploadsResult page, and the markers of the
/// next page when it is truncated.
fn parse_uploads(xml: &str) -> (Vec<Upload>, Option<(String, String)>) {
    let mut uploads = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<Upload>") {
        let Some(len) = rest[start..].find("</Upload>") else {
            break;
        };
        let block = &rest[start..start + len];
        if let (Some(k), Some(id)) = (xml_text(block, "Key"), xml_text(block, "UploadId")) {
            uploads.push(Upload {
                key: unescape(k),
                id: unescape(id),
            });
        }
        rest = &rest[start + len..];
    }
    let truncated = xml_text(xml, "IsTruncated").is_some_and(|t| t.trim() == "true");
    let next = match (
        xml_text(xml, "NextKeyMarker"),
        xml_text(xml, "NextUploadIdMarker"),
    ) {
        (Some(k), Some(u)) if truncated => Some((unescape(k), unescape(u))),
        _ => None,
    };
    (uploads, next)
}

#[derive(Debug, Clone)]
pub(crate) struct ArchiveLocation {
    /// Rooted at the archive root: keys are `raw/events/…`, `dlq/…`, `rollups/…`.
    pub store: Arc<dyn ObjectStore>,
    pub local_root: Option<PathBuf>,
    pub s3: Option<S3Location>,
}

fn store_error(path: &str, e: object_store::Error) -> SinkError {
    SinkError::ObjectStore {
        path: path.to_string(),
        source: Box::new(e),
    }
}

impl ArchiveLocation {
    /// Open the configured archive. No network traffic: a wrong endpoint or
    /// missing bucket surfaces at the first write or read.
    pub(crate) fn open(cfg: &StorageConfig) -> Result<ArchiveLocation, crate::Error> {
        if cfg.archive_url.is_empty() {
            return Ok(ArchiveLocation::local(&cfg.data_dir)?);
        }
        let rest = cfg
            .archive_url
            .strip_prefix("s3://")
            .ok_or_else(|| ConfigError::Invalid {
                key: "storage.archive_url".into(),
                message: format!(
                    "{:?}: use \"\" for storage.data_dir or s3://BUCKET/PREFIX",
                    cfg.archive_url
                ),
            })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (k, v) in &cfg.options {
            let key = AmazonS3ConfigKey::from_str(k).map_err(|_| ConfigError::Invalid {
                key: format!("storage.options.{k}"),
                message: "not an object_store S3 option; use e.g. aws_endpoint, aws_region, aws_access_key_id, \
                          aws_secret_access_key, aws_session_token, aws_allow_http, aws_virtual_hosted_style_request"
                    .into(),
            })?;
            builder = builder.with_config(key, v.to_string());
        }
        let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
        let region = builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = builder
            .get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v == "true");
        let allow_http = builder
            .get_config_value(&AmazonS3ConfigKey::Client(
                object_store::ClientConfigKey::AllowHttp,
            ))
            .is_some_and(|v| v == "true");
        // As object_store addresses the bucket (AmazonS3Builder::build).
        let bucket_url = match (endpoint, virtual_hosted) {
            (Some(e), true) => e,
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let s3 = builder.build().map_err(|e| ConfigError::Invalid {
            key: "storage.archive_url".into(),
            message: format!("{}: {e}", cfg.archive_url),
        })?;
        let prefix = prefix.trim_matches('/').to_string();
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3.clone())
        } else {
            Arc::new(PrefixStore::new(s3.clone(), prefix.as_str()))
        };
        Ok(ArchiveLocation {
            store,
            local_root: None,
            s3: Some(S3Location {
                bucket: bucket.to_string(),
                prefix,
                bucket_store: Arc::new(s3),
                bucket_url,
                region,
                allow_http,
            }),
        })
    }

    /// An archive rooted at a local directory (created if missing).
    pub(crate) fn local(dir: &Path) -> Result<ArchiveLocation, SinkError> {
        let io = |e: std::io::Error| {
            store_error(
                &dir.display().to_string(),
                object_store::Error::Generic {
                    store: "local",
                    source: Box::new(e),
                },
            )
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let root = std::fs::canonicalize(dir).map_err(io)?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| store_error(&dir.display().to_string(), e))?;
        Ok(ArchiveLocation {
            store: Arc::new(fs),
            local_root: Some(root),
            s3: None,
        })
    }

    /// Where an archive-relative path lives, as DataFusion (and analysts)
    /// address it: an absolute file path, or `s3://bucket/prefix/rel`.
    pub(crate) fn url(&self, rel: &str) -> String {
        match (&self.s3, &self.local_root) {
            (Some(s3), _) => format!("s3://{}/{}", s3.bucket, s3.key(rel)),
            (None, Some(root)) => root.join(rel).display().to_string(),
            (None, None) => rel.to_string(),
        }
    }

    /// Make [`Self::url`]s readable by `ctx` (S3 needs its store registered).
    pub(crate) fn register(&self, ctx: &SessionContext) -> Result<(), SinkError> {
        if let Some(s3) = &self.s3 {
            let url = ObjectStoreUrl::parse(format!("s3://{}", s3.bucket)).map_err(|e| {
                SinkError::ObjectStore {
                    path: format!("s3://{}", s3.bucket),
                    source: Box::new(object_store::Error::Generic {
                        store: "S3",
                        source: Box::new(e),
                    }),
                }
            })?;
            ctx.register_object_store(url.as_ref(), s3.bucket_store.clone());
        }
        Ok(())
    }

    /// For logs: the directory or the s3:// URL of the archive root.
    pub(crate) fn describe(&self) -> String {
        match (&self.s3, &self.local_root) {
            (Some(s3), _) if s3.prefix.is_empty() => format!("s3://{}", s3.bucket),
            (Some(s3), _) => format!("s3://{}/{}", s3.bucket, s3.prefix),
            (None, Some(root)) => root.display().to_string(),
            (None, None) => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn storage(pairs: &[(&str, &str)]) -> Result<StorageConfig, String> {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Settings::load(None, env)
            .map(|s| s.storage)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn s3_urls_keep_the_layout_under_the_prefix() {
        let cfg = storage(&[
            ("TALLY__STORAGE__ARCHIVE_URL", "s3://lake/tally/prod"),
            (
                "TALLY__STORAGE__OPTIONS__AWS_ENDPOINT",
                "http://127.0.0.1:9",
            ),
            ("TALLY__STORAGE__OPTIONS__AWS_ALLOW_HTTP", "true"),
            ("TALLY__STORAGE__OPTIONS__AWS_REGION", "us-east-1"),
        ])
        .unwrap();
        let loc = ArchiveLocation::open(&cfg).unwrap();
        assert_eq!(loc.describe(), "s3://lake/tally/prod");
        assert_eq!(
            loc.url("raw/events/dt=2026-11-28/hour=09/f.parquet"),
            "s3://lake/tally/prod/raw/events/dt=2026-11-28/hour=09/f.parquet"
        );
        let s3 = loc.s3.as_ref().unwrap();
        assert_eq!(s3.key("dlq/x").as_ref(), "tally/prod/dlq/x");
        let bare = ArchiveLocation::open(
            &storage(&[("TALLY__STORAGE__ARCHIVE_URL", "s3://lake")]).unwrap(),
        )
        .unwrap();
        assert_eq!(bare.url("raw/a"), "s3://lake/raw/a");
    }

    #[test]
    fn bad_archive_settings_name_the_key() {
        let e = storage(&[("TALLY__STORAGE__ARCHIVE_URL", "gs://lake")]).unwrap_err();
        assert!(
            e.contains("storage.archive_url") && e.contains("s3://BUCKET/PREFIX"),
            "{e}"
        );
        let e = storage(&[("TALLY__STORAGE__ARCHIVE_URL", "s3://")]).unwrap_err();
        assert!(
            e.contains("storage.archive_url") && e.contains("bucket"),
            "{e}"
        );
        let e = storage(&[("TALLY__STORAGE__OPTIONS__AWS_ENDPOINT", "http://x")]).unwrap_err();
        assert!(
            e.contains("storage.options") && e.contains("archive_url"),
            "{e}"
        );
        let e = storage(&[("TALLY__STORAGE__MULTIPART_THRESHOLD", "1MiB")]).unwrap_err();
        assert!(
            e.contains("storage.multipart_threshold") && e.contains("5MiB"),
            "{e}"
        );
        let e = storage(&[("TALLY__STORAGE__ORPHAN_SWEEP_INTERVAL", "200ms")]).unwrap_err();
        assert!(
            e.contains("storage.orphan_sweep_interval") && e.contains("at least 1s"),
            "{e}"
        );
        let e = storage(&[("TALLY__STORAGE__ORPHAN_SWEEP_INTERVAL", "soon")]).unwrap_err();
        assert!(e.contains("orphan_sweep_interval"), "{e}");
        let cfg = storage(&[
            ("TALLY__STORAGE__ARCHIVE_URL", "s3://lake"),
            ("TALLY__STORAGE__OPTIONS__AWS_ENDPOINTT", "http://x"),
        ])
        .unwrap();
        let e = ArchiveLocation::open(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("storage.options.aws_endpointt") && e.contains("aws_endpoint"),
            "{e}"
        );
    }

    #[test]
    fn upload_listings_parse_with_paging_markers() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult><Bucket>lake</Bucket><IsTruncated>true</IsTruncated>
<NextKeyMarker>p/raw/events/b.parquet</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>
<Upload><Key>p/raw/events/a&amp;b.parquet</Key><UploadId>u1</UploadId><Initiated>2026-11-28T00:00:00Z</Initiated></Upload>
<Upload><Key>p/raw/events/b.parquet</Key><UploadId>u2</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        let (uploads, next) = parse_uploads(xml);
        assert_eq!(uploads.len(), 2);
        assert_eq!(
            uploads[0],
            Upload {
                key: "p/raw/events/a&b.parquet".into(),
                id: "u1".into()
            }
        );
        assert_eq!(next, Some(("p/raw/events/b.parquet".into(), "u2".into())));
        let (none, end) = parse_uploads("<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>");
        assert!(none.is_empty() && end.is_none());
        assert_eq!(encode("a/dt=2026-11-28 x"), "a%2Fdt%3D2026-11-28%20x");
    }

    #[test]
    fn local_urls_are_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ArchiveLocation::local(dir.path()).unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            loc.url("raw/events/a.parquet"),
            root.join("raw/events/a.parquet").display().to_string()
        );
        assert!(loc.s3.is_none());
    }
}
