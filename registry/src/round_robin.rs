//! Client-side round robin over a service's registered instances.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

use crate::View;

/// Takes the members of a [`crate::Follower`]'s view in turn.
#[derive(Debug)]
pub struct RoundRobin {
    view: watch::Receiver<View>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(view: watch::Receiver<View>) -> Self {
        RoundRobin {
            view,
            next: AtomicUsize::new(0),
        }
    }

    /// Every member's address, starting with the one whose turn it is: a
    /// caller tries them in this order, moving on when one cannot be
    /// reached. Empty while no instance is registered.
    pub fn candidates(&self) -> Vec<String> {
        let view = self.view.borrow();
        let members = &view.members;
        if members.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % members.len();
        members[start..]
            .iter()
            .chain(&members[..start])
            .map(|m| m.entry.address.clone())
            .collect()
    }

    /// The view the candidates come from.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }
}
