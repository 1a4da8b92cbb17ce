//! Analytics: gathers a school's facts for the pure rules in
//! [`quotad_core::analytics`] (slices and pools from the engine's memory,
//! which is fresher than Postgres; daily usage from Postgres), and keeps the
//! active-alert gauges up to date with a background pass.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::engine::{Engine, EngineError, SchoolView};
use crate::postgres::analytics::{ReadError, Reader, RollupQuery, RollupRow};
use crate::telemetry;
use quotad_core::analytics::{
    alerts, suggestions, Alert, AlertKind, AlertThresholds, PoolFacts, SchoolFacts, SliceFacts,
    Suggestions, DAY_MS, RECENT_DAYS,
};
use quotad_core::{SchoolId, ServiceType, TimestampMs};

/// Schools one alert pass looks at, at most (a page of ids at a time).
const ALERT_PASS_SCHOOLS_MAX: usize = 100_000;
const ALERT_PASS_PAGE_SCHOOLS: usize = 500;

#[derive(Debug, Error)]
pub enum AnalyticsError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Read(#[from] ReadError),
}

pub struct Analytics {
    engine: Engine,
    /// None: no Postgres configured; every analytics call says so.
    reader: Option<Arc<Reader>>,
    thresholds: AlertThresholds,
}

/// Suggestions with the school's cycle they were made in.
pub struct SchoolSuggestions {
    pub school: SchoolView,
    pub now_ms: TimestampMs,
    pub suggestions: Suggestions,
}

impl Analytics {
    pub fn new(engine: Engine, reader: Option<Arc<Reader>>, thresholds: AlertThresholds) -> Self {
        Self {
            engine,
            reader,
            thresholds,
        }
    }

    fn reader(&self) -> Result<&Reader, ReadError> {
        self.reader.as_deref().ok_or(ReadError::NotConfigured)
    }

    /// The school as the rules see it now, optionally one service type only.
    async fn facts(
        &self,
        school_id: &SchoolId,
        service: Option<ServiceType>,
    ) -> Result<(SchoolView, SchoolFacts), AnalyticsError> {
        let reader = self.reader()?;
        let school = self.engine.get_school(school_id).await?;
        let allocations = self
            .engine
            .list_allocations(school_id, None, service.clone())
            .await?;
        let now_ms = self.engine.clock().now_ms();
        // The burn rate looks at this cycle's last RECENT_DAYS days, the
        // anomaly baseline at the RECENT_DAYS before today: one more day covers both.
        let rows = reader
            .daily_units(school_id, now_ms - (RECENT_DAYS + 1) * DAY_MS)
            .await?;
        let mut daily: HashMap<(String, String), Vec<(TimestampMs, u64)>> = HashMap::new();
        for row in rows {
            daily
                .entry((row.teacher_id, row.service_type))
                .or_default()
                .push((row.day_start_ms, row.units));
        }
        let slices = allocations
            .into_iter()
            .map(|a| SliceFacts {
                daily_units: daily
                    .remove(&(a.teacher_id.to_string(), a.service.to_string()))
                    .unwrap_or_default(),
                teacher_id: a.teacher_id,
                service: a.service,
                allocated_units: a.allocated_units,
                used_units: a.used_units,
                status: a.status,
            })
            .collect();
        let pools = school
            .pools
            .iter()
            .filter(|p| service.as_ref().is_none_or(|s| s == &p.service))
            .map(|p| PoolFacts {
                service: p.service.clone(),
                cycle_units: p.cycle_units,
                used_units: p.used_units,
            })
            .collect();
        let facts = SchoolFacts {
            cycle: school.cycle,
            now_ms,
            pools,
            slices,
        };
        Ok((school, facts))
    }

    pub async fn suggestions(
        &self,
        school_id: &SchoolId,
        service: Option<ServiceType>,
    ) -> Result<SchoolSuggestions, AnalyticsError> {
        let (school, facts) = self.facts(school_id, service).await?;
        Ok(SchoolSuggestions {
            school,
            now_ms: facts.now_ms,
            suggestions: suggestions(&facts),
        })
    }

    pub async fn alerts(&self, school_id: &SchoolId) -> Result<Vec<Alert>, AnalyticsError> {
        let (_, facts) = self.facts(school_id, None).await?;
        Ok(alerts(&facts, &self.thresholds))
    }

    /// Rollups of a school that exists (NOT_FOUND otherwise, as every call).
    pub async fn rollups(
        &self,
        query: &RollupQuery,
    ) -> Result<(Vec<RollupRow>, bool), AnalyticsError> {
        let reader = self.reader()?;
        self.engine.get_school(&query.school_id).await?;
        Ok(reader.rollups(query).await?)
    }

    /// The cycle start of a school, for rollups without a range.
    pub async fn cycle_start_ms(
        &self,
        school_id: &SchoolId,
    ) -> Result<TimestampMs, AnalyticsError> {
        Ok(self.engine.get_school(school_id).await?.cycle.start_ms)
    }

    /// Every `interval`, counts the active alerts of every school and sets
    /// `quotad_alerts_active{kind}`. Runs apart from the gate: one school at a
    /// time, over the analytics connection. A school whose alerts cannot be
    /// computed is counted in `quotad_alerts_failures_total` and left out.
    pub async fn run_alert_gauges(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let counts = self.count_alerts().await;
            for kind in AlertKind::ALL {
                telemetry::alerts_active(kind.as_str(), counts.get(&kind).copied().unwrap_or(0));
            }
        }
    }

    async fn count_alerts(&self) -> HashMap<AlertKind, usize> {
        let mut counts = HashMap::new();
        let mut after: Option<SchoolId> = None;
        let mut seen = 0;
        while seen < ALERT_PASS_SCHOOLS_MAX {
            let page = self
                .engine
                .list_schools(None, after.as_ref(), ALERT_PASS_PAGE_SCHOOLS)
                .await;
            let (schools, next) = match page {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "alert pass: cannot list schools");
                    break;
                }
            };
            for school in &schools {
                match self.alerts(&school.config.id).await {
                    Ok(found) => {
                        for alert in found {
                            *counts.entry(alert.kind).or_insert(0) += 1;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(school = %school.config.id, %error, "alert pass: school skipped");
                        telemetry::alerts_failed();
                    }
                }
            }
            seen += schools.len();
            match next {
                Some(id) => after = Some(id),
                None => break,
            }
        }
        counts
    }
}
