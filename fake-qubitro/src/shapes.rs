//! The list and pagination shapes, without HTTP: the layouts a list answer can take, the
//! switches that choose them, and the query (filter and page).

use std::collections::HashMap;

use axum::extract::Query;
use axum::http::Uri;
use serde::{Deserialize, Serialize};

/// The metadata key onboardd files a sensor's id under, and the one
/// [`ListShape::SensorIdUnderOtherKey`] shows instead.
pub(crate) const SENSOR_ID_KEY: &str = "sensor_id";
pub(crate) const OTHER_SENSOR_ID_KEY: &str = "sensorId";

/// How the list endpoint lays out its answer. Only [`ListShape::Standard`] is what the
/// documentation shows; the others are what an API change, or a client reading the wrong
/// field, would look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListShape {
    /// Wrapped: `{"success":true,"action":…,"status":200,"message":…,"data":[items]}`;
    /// bare: `[items]`.
    #[default]
    Standard,
    /// The array under `"devices"`: wrapped `data: {"devices":[…]}`, bare `{"devices":[…]}`.
    DevicesKey,
    /// The array under `"items"`: wrapped `data: {"items":[…]}`, bare `{"items":[…]}`.
    ItemsKey,
    /// A layout no client knows: wrapped `data: {"rows_v3":[…]}`, bare
    /// `{"result":{"rows_v3":[…]}}`.
    Unrecognised,
    /// The standard layout, but items have no `metadata` key.
    NoMetadata,
    /// The standard layout, but each item's metadata carries the sensor id under `"sensorId"`
    /// instead of `"sensor_id"`. The filter still finds the device: `sensor_id:ID` and
    /// `sensorId:ID` both match a device whose sensor id is ID.
    SensorIdUnderOtherKey,
}

/// The list switches, changeable at run time; [`FakeQubitro::reset`] restores the options'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListOptions {
    pub(crate) shape: ListShape,
    pub(crate) page_size: Option<usize>,
    pub(crate) ignores_filter: bool,
    pub(crate) newest_first: bool,
    pub(crate) created_at_field: bool,
}

/// The query of a list call.
pub(crate) struct ListQuery {
    /// `?metadata=key:value,key2:value2` → pairs that must all match; no parameter, no filter.
    pub(crate) filter: Vec<(String, String)>,
    /// `?page=N`, 1-based; only looked at when the list is paginated.
    pub(crate) page: usize,
}

impl ListQuery {
    pub(crate) fn parse(uri: &Uri) -> Result<ListQuery, String> {
        let mut query = ListQuery {
            filter: Vec::new(),
            page: 1,
        };
        if uri.query().is_none() {
            return Ok(query);
        }
        let Query(params) = Query::<HashMap<String, String>>::try_from_uri(uri)
            .map_err(|e| format!("invalid query string: {e}"))?;
        if let Some(page) = params.get("page") {
            query.page = page
                .parse()
                .ok()
                .filter(|&p: &usize| p >= 1)
                .ok_or("page must be a positive integer")?;
        }
        if let Some(spec) = params.get("metadata").filter(|s| !s.is_empty()) {
            query.filter = spec
                .split(',')
                .map(|pair| {
                    pair.split_once(':')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| {
                            "metadata filter must be key:value pairs separated by commas".to_owned()
                        })
                })
                .collect::<Result<_, _>>()?;
        }
        Ok(query)
    }
}
