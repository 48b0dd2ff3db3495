//! ListSandboxes: filters, a stable order (creation time, then id) and
//! page tokens that name the last item of the previous page.

use std::time::SystemTime;

use super::{lock, Manager, ManagerError};
use crate::engine::Engine;
use crate::model::{Principal, SandboxId, SandboxRecord, State};

/// Which states a listing includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFilter {
    /// Every state (subject to `show_terminated`).
    #[default]
    Any,
    /// One state; a terminal one implies `show_terminated`.
    Only(State),
    /// A state this server never uses (e.g. PAUSED): nothing matches.
    Nothing,
}

/// A ListSandboxes query.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// The sandbox must carry every one of these.
    pub tags: Vec<String>,
    /// State filter.
    pub state: StateFilter,
    /// Include terminal sandboxes.
    pub show_terminated: bool,
    /// Page size; 0 means [`ListQuery::DEFAULT_PAGE_SIZE`].
    pub page_size: usize,
    /// Token of the previous page's last item.
    pub page_token: Option<String>,
    /// Newest first instead of oldest first.
    pub descending: bool,
}

impl ListQuery {
    /// Page size when none is given.
    pub const DEFAULT_PAGE_SIZE: usize = 100;
    /// Largest page size honoured.
    pub const MAX_PAGE_SIZE: usize = 1000;
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// The sandboxes, in order.
    pub sandboxes: Vec<SandboxRecord>,
    /// Token for the next page; `None` on the last.
    pub next_page_token: Option<String>,
}

impl<E: Engine> Manager<E> {
    /// The caller's sandboxes matching `query`, one page.
    pub fn list(&self, principal: &Principal, query: &ListQuery) -> Result<ListPage, ManagerError> {
        let after = query
            .page_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(|t| PageKey::parse(t).ok_or(ManagerError::InvalidPageToken))
            .transpose()?;
        let show_terminated =
            query.show_terminated || matches!(query.state, StateFilter::Only(s) if s.is_terminal());
        let table = lock(&self.inner.table);
        let mut matching: Vec<&SandboxRecord> = table
            .records()
            .filter(|r| &r.principal == principal)
            .filter(|r| show_terminated || !r.state.is_terminal())
            .filter(|r| match query.state {
                StateFilter::Any => true,
                StateFilter::Only(s) => r.state == s,
                StateFilter::Nothing => false,
            })
            .filter(|r| r.has_all_tags(&query.tags))
            .collect();
        matching.sort_by_key(|r| PageKey::of(r));
        if query.descending {
            matching.reverse();
        }
        if let Some(after) = &after {
            matching.retain(|r| {
                let key = PageKey::of(r);
                if query.descending {
                    key < *after
                } else {
                    key > *after
                }
            });
        }
        let size = match query.page_size {
            0 => ListQuery::DEFAULT_PAGE_SIZE,
            n => n.min(ListQuery::MAX_PAGE_SIZE),
        };
        let more = matching.len() > size;
        matching.truncate(size);
        let next_page_token = if more {
            matching.last().map(|r| PageKey::of(r).token())
        } else {
            None
        };
        Ok(ListPage {
            sandboxes: matching.into_iter().cloned().collect(),
            next_page_token,
        })
    }
}

/// Sort key and page token: creation time, then id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct PageKey {
    create_ns: u128,
    id: SandboxId,
}

impl PageKey {
    pub(super) fn of(r: &SandboxRecord) -> Self {
        Self {
            create_ns: r
                .create_time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            id: r.id.clone(),
        }
    }

    fn token(&self) -> String {
        format!("{}.{}", self.create_ns, self.id)
    }

    fn parse(token: &str) -> Option<Self> {
        let (ns, id) = token.split_once('.')?;
        Some(Self {
            create_ns: ns.parse().ok()?,
            id: SandboxId::parse(id).ok()?,
        })
    }
}
