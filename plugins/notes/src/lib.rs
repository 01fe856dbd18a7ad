//! `notes`: a small JSON API that keeps its records in memory. Run it with
//! `cargo xtask build-plugins && cargo run -p host`, then
//! `curl -d '{"text":"buy milk"}' http://notes.localhost:7777/notes`.
//!
//! Routes: `GET /notes`, `POST /notes`, `GET /notes/{id}`, `DELETE /notes/{id}`.
//! Its records survive a reload of the library: `export_state` hands them to the next
//! generation's `init`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use plugin_api::tracing::{info, warn};
use plugin_api::{export_plugin, Error, InitContext, Json, Microserver, Request, Response, Routes};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// How many notes the server keeps before refusing new ones.
    max_notes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_notes: 1000 }
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Note {
    id: u64,
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNote {
    text: String,
}

#[derive(Default, Serialize, Deserialize)]
struct Store {
    next_id: u64,
    notes: BTreeMap<u64, Note>,
}

pub struct Notes {
    max_notes: usize,
    store: Mutex<Store>,
}

impl Microserver for Notes {
    fn init(ctx: &InitContext<'_>) -> Result<Self, Error> {
        let config: Config = ctx.config::<Option<Config>>()?.unwrap_or_default();
        let store = match ctx.previous_state() {
            Some(bytes) => match serde_json::from_slice::<Store>(bytes) {
                Ok(store) => {
                    info!(
                        notes = store.notes.len(),
                        "restored notes from the previous generation"
                    );
                    store
                }
                Err(e) => {
                    warn!(error = %e, "could not read the previous generation's notes; starting empty");
                    Store::default()
                }
            },
            None => Store::default(),
        };
        Ok(Notes {
            max_notes: config.max_notes,
            store: Mutex::new(store),
        })
    }

    fn routes(routes: &mut Routes<Self>) {
        routes
            .get("/notes", Self::list)
            .post("/notes", Self::create)
            .get("/notes/{id}", Self::get)
            .delete("/notes/{id}", Self::delete);
    }

    fn export_state(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(&*self.store()).ok()
    }
}

impl Notes {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A handler that panicked while holding the lock left the map consistent (every
        // change is a single insert or remove), so the poison flag can be ignored.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn list(self: Arc<Self>, _req: Request) -> Json<Vec<Note>> {
        Json(self.store().notes.values().cloned().collect())
    }

    async fn create(self: Arc<Self>, req: Request) -> Result<Response, Error> {
        let new: NewNote = req.json()?;
        if new.text.trim().is_empty() {
            return Err(Error::bad_request("text must not be empty"));
        }
        let mut store = self.store();
        if store.notes.len() >= self.max_notes {
            return Err(Error::new(
                409,
                format!("the limit of {} notes is reached", self.max_notes),
            ));
        }
        store.next_id += 1;
        let note = Note {
            id: store.next_id,
            text: new.text,
        };
        store.notes.insert(note.id, note.clone());
        Ok(Response::json(&note)
            .with_status(201)
            .with_header("location", &format!("/notes/{}", note.id)))
    }

    async fn get(self: Arc<Self>, req: Request) -> Result<Json<Note>, Error> {
        let id = note_id(&req)?;
        let store = self.store();
        let note = store.notes.get(&id).ok_or_else(|| missing(id))?;
        Ok(Json(note.clone()))
    }

    async fn delete(self: Arc<Self>, req: Request) -> Result<Response, Error> {
        let id = note_id(&req)?;
        self.store().notes.remove(&id).ok_or_else(|| missing(id))?;
        Ok(Response::new(204))
    }
}

fn note_id(req: &Request) -> Result<u64, Error> {
    let raw = req.param("id").unwrap_or_default();
    raw.parse()
        .map_err(|_| Error::bad_request(format!("note id must be a number, not {raw:?}")))
}

fn missing(id: u64) -> Error {
    Error::not_found(format!("no note with id {id}"))
}

export_plugin!(Notes);
