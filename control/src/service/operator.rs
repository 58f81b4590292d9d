//! The operator API: read-only views of agents, allocations and conferences.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use proto::control::v1::operator_server::Operator;
use proto::control::v1::{
    AgentAllocation, AgentInfo, ConferenceCounters, ConferenceInfo, ListAgentsRequest,
    ListAgentsResponse, ListAllocationsRequest, ListAllocationsResponse, ListConferencesRequest,
    ListConferencesResponse,
};

use super::{blocking, now_unix};
use crate::state::State;

pub struct OperatorService {
    state: Arc<State>,
}

impl OperatorService {
    pub fn new(state: Arc<State>) -> Self {
        OperatorService { state }
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn list_agents(
        &self,
        _request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let (registrations, current_revision) = blocking(&self.state, |state| {
            Ok((state.store().agents()?, state.store().revision()?))
        })
        .await?;
        let live = self.state.live_agents();
        let agents = registrations
            .into_iter()
            .map(|registration| {
                let live = live.get(&registration.agent_id);
                let status = live.and_then(|l| l.status.clone()).unwrap_or_default();
                AgentInfo {
                    connected: live.is_some_and(|l| l.connected),
                    last_report_unix: live.map_or(0, |l| l.last_report_unix),
                    applied_revision: status.applied_revision,
                    health: status.health,
                    counters: status.counters,
                    registration: Some(registration),
                }
            })
            .collect();
        Ok(Response::new(ListAgentsResponse {
            agents,
            current_revision,
        }))
    }

    async fn list_allocations(
        &self,
        request: Request<ListAllocationsRequest>,
    ) -> Result<Response<ListAllocationsResponse>, Status> {
        let request = request.into_inner();
        let mut live: Vec<_> = self.state.live_agents().into_iter().collect();
        live.sort_by(|a, b| a.0.cmp(&b.0));
        let mut allocations = Vec::new();
        let mut allocations_not_listed = 0u64;
        for (agent_id, agent) in live {
            if !request.agent_id.is_empty() && request.agent_id != agent_id {
                continue;
            }
            let Some(status) = agent.status else { continue };
            allocations_not_listed =
                allocations_not_listed.saturating_add(status.allocations_not_listed);
            for allocation in status.allocations {
                if !request.user.is_empty() && request.user != allocation.user {
                    continue;
                }
                allocations.push(AgentAllocation {
                    agent_id: agent_id.clone(),
                    allocation: Some(allocation),
                    reported_at_unix: agent.last_report_unix,
                });
            }
        }
        Ok(Response::new(ListAllocationsResponse {
            allocations,
            allocations_not_listed,
        }))
    }

    async fn list_conferences(
        &self,
        _request: Request<ListConferencesRequest>,
    ) -> Result<Response<ListConferencesResponse>, Status> {
        let now = now_unix();
        let snapshot = blocking(&self.state, move |state| state.snapshot(now)).await?;
        // Sum what every agent last reported, per conference.
        let mut counters: HashMap<String, ConferenceCounters> = HashMap::new();
        for agent in self.state.live_agents().into_values() {
            for reported in agent.status.map(|s| s.conferences).unwrap_or_default() {
                let sum = counters
                    .entry(reported.conference_id.clone())
                    .or_insert_with(|| ConferenceCounters {
                        conference_id: reported.conference_id.clone(),
                        ..ConferenceCounters::default()
                    });
                sum.active_participants = sum
                    .active_participants
                    .saturating_add(reported.active_participants);
                sum.joins_total = sum.joins_total.saturating_add(reported.joins_total);
                sum.joins_refused = sum.joins_refused.saturating_add(reported.joins_refused);
            }
        }
        let conferences =
            snapshot
                .conferences
                .into_iter()
                .map(|conference| ConferenceInfo {
                    counters: Some(counters.remove(&conference.conference_id).unwrap_or_else(
                        || ConferenceCounters {
                            conference_id: conference.conference_id.clone(),
                            ..ConferenceCounters::default()
                        },
                    )),
                    conference_id: conference.conference_id,
                    expires_at_unix: conference.expires_at_unix,
                    anonymous_allowed: conference.anonymous_allowed,
                    max_participants: conference.max_participants,
                    created_at_unix: conference.created_at_unix,
                    updated_at_unix: conference.updated_at_unix,
                })
                .collect();
        Ok(Response::new(ListConferencesResponse { conferences }))
    }
}
