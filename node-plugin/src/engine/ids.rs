//! IDs of the engine's objects: the location new ones get, and what an ID resolves to.

use std::sync::Arc;

use super::EngineCore;
use crate::error::{Error, Result};
use crate::pool::id::{IdKind, Location, ObjectId};
use crate::pool::{ObjectName, Pool, PoolKind, VolumeRecord};

impl EngineCore {
    /// The location of new objects in `pool`.
    pub(super) fn location(&self, pool: &Pool) -> Location {
        Location {
            pool: pool.name().clone(),
            node: (pool.kind() == PoolKind::Local).then(|| self.config.node.clone()),
        }
    }

    pub(super) fn object_id(
        &self,
        kind: IdKind,
        pool: &Pool,
        name: &ObjectName,
    ) -> Result<ObjectId> {
        Ok(ObjectId::new(kind, self.location(pool), name.clone())?)
    }

    /// The ID of a volume record: of this node's location, or (a volume moved here) of the
    /// node it was moved from.
    pub(super) fn volume_id(&self, pool: &Pool, record: &VolumeRecord) -> Result<ObjectId> {
        let mut id = self.object_id(IdKind::Volume, pool, &record.name)?;
        if let Some(home) = &record.home {
            id.location.node = Some(home.clone());
        }
        Ok(id)
    }

    /// The ID of the volume named `name` in `pool` (see [`EngineCore::volume_id`]); a name
    /// without a record gets this node's location.
    pub(super) fn volume_id_by_name(&self, pool: &Pool, name: &ObjectName) -> Result<ObjectId> {
        match pool.volume(name) {
            Some(record) => self.volume_id(pool, &record),
            None => self.object_id(IdKind::Volume, pool, name),
        }
    }

    /// Resolves an ID to its pool: the pool must be ours, and so must the node for local pools
    /// (or, for a volume moved here, the node it was moved from, which its ID keeps). An ID of
    /// another kind than `kind` names nothing of that kind.
    pub(super) fn resolve(&self, kind: IdKind, id: &ObjectId) -> Result<(Arc<Pool>, ObjectId)> {
        let what = match kind {
            IdKind::Volume => "volume",
            IdKind::Snapshot => "snapshot",
            IdKind::Group => "group snapshot",
        };
        let not_found = || Error::NotFound { what, id: id.to_string() };
        if id.kind != kind {
            return Err(not_found());
        }
        let pool = self.pools.get(&id.location.pool).cloned().ok_or_else(not_found)?;
        pool.refresh()?;
        let here = self.location(&pool);
        if kind == IdKind::Volume && here.node.is_some() {
            // A local pool's volume answers to one ID: its home's if it was moved here.
            let home = pool.volume(&id.name).and_then(|r| r.home);
            let expected = home.as_ref().or(here.node.as_ref());
            if id.location.pool != here.pool || id.location.node.as_ref() != expected {
                return Err(not_found());
            }
        } else if id.location != here {
            return Err(not_found());
        }
        Ok((pool, id.clone()))
    }

    pub(super) fn resolve_volume(
        &self,
        id: &ObjectId,
    ) -> Result<(Arc<Pool>, ObjectId, VolumeRecord)> {
        let (pool, parsed) = self.resolve(IdKind::Volume, id)?;
        let record = pool
            .volume(&parsed.name)
            .ok_or_else(|| Error::NotFound { what: "volume", id: id.to_string() })?;
        Ok((pool, parsed, record))
    }
}
