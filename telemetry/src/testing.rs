//! For tests (feature `testing`): a log writer that keeps what it is
//! given, to compare the lines a formatter writes.

use std::sync::{Arc, Mutex, PoisonError};

/// Keeps every byte written to it; its clones write to the same buffer,
/// so one can be handed to `with_writer(move || sink.clone())` and the
/// other read with [`Captured::text`].
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// What was written so far (as UTF-8, lossily).
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
