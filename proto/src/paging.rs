//! Paged lists on the agent protocol (`ListVolumes`, `ListSnapshots`, `ListVolumeHealth`): a
//! page is the entries after the previous page's last ID, in ID order, so that tens of
//! thousands of volumes never make one message larger than gRPC allows, and an entry added or
//! removed between pages moves no other entry across a page boundary.
//!
//! ```text
//!   caller ── ListRequest{max, token ""} ──► agent: sort by ID, take ≤ PAGE after token
//!          ◄── entries, next_token = last ID (or "" on the last page)
//!          ── ListRequest{max, token} ──► … until next_token is ""
//! ```

use std::future::Future;

use tonic::Status;

use crate::agent::ListRequest;

/// The most entries one page carries. A volume's entry is under 2 KiB even with its labels at
/// Kubernetes' limits (IDs ≤ 253 bytes), so a page stays far below gRPC's 4 MiB default.
pub const PAGE: usize = 1000;

/// The page of `entries` (in any order) that `request` asks for, and the token of the next
/// page (empty when this is the last).
pub fn page<T>(
    mut entries: Vec<T>,
    id: impl Fn(&T) -> &str,
    request: &ListRequest,
) -> (Vec<T>, String) {
    let size = match request.max_entries as usize {
        0 => PAGE,
        n => n.min(PAGE),
    };
    entries.retain(|e| id(e) > request.starting_token.as_str());
    entries.sort_by(|a, b| id(a).cmp(id(b)));
    let more = entries.len() > size;
    entries.truncate(size);
    let next = match (more, entries.last()) {
        (true, Some(last)) => id(last).to_owned(),
        _ => String::new(),
    };
    (entries, next)
}

/// Every entry, asking page after page with `list` (an agent's list call, answering a page
/// and its next token) until the last.
pub async fn all_pages<T, F, Fut>(mut list: F) -> Result<Vec<T>, Status>
where
    F: FnMut(ListRequest) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (entries, next) =
            list(ListRequest { max_entries: 0, starting_token: token.clone() }).await?;
        all.extend(entries);
        if next.is_empty() {
            return Ok(all);
        }
        if next <= token {
            return Err(Status::internal(format!(
                "an agent's list went back from {token:?} to {next:?}: its pages would never end"
            )));
        }
        token = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn ids(n: usize) -> Vec<String> {
        (0..n).rev().map(|i| format!("vol:local:v{i:05}")).collect()
    }

    #[tokio::test]
    async fn pages_walk_every_entry_once_in_id_order() {
        let entries = ids(2500);
        let listed = all_pages(|r| {
            let (page, next) = page(entries.clone(), |s| s.as_str(), &r);
            assert!(page.len() <= PAGE);
            std::future::ready(Ok((page, next)))
        })
        .await
        .expect("listed");
        let mut expected = entries.clone();
        expected.sort();
        assert_eq!(listed, expected);
    }

    #[test]
    fn a_page_is_bounded_and_resumes_after_its_last_id() {
        let request =
            |max, token: &str| ListRequest { max_entries: max, starting_token: token.into() };
        let (first, next) = page(ids(10), |s| s.as_str(), &request(4, ""));
        assert_eq!(first.len(), 4);
        assert_eq!(next, first[3]);
        let (second, _) = page(ids(10), |s| s.as_str(), &request(4, &next));
        assert_eq!(second[0], "vol:local:v00004");
        let (last, next) = page(ids(10), |s| s.as_str(), &request(0, "vol:local:v00007"));
        assert_eq!((last.len(), next.as_str()), (2, ""), "the last page says so");
        let (capped, _) = page(ids(5000), |s| s.as_str(), &request(100_000, ""));
        assert_eq!(capped.len(), PAGE, "a larger ask is capped");
        // An entry deleted between pages moves nothing across the boundary.
        let mut fewer = ids(10);
        fewer.retain(|i| i != "vol:local:v00001");
        let (after, _) = page(fewer, |s| s.as_str(), &request(4, &first[3]));
        assert_eq!(after[0], "vol:local:v00004");
    }

    #[tokio::test]
    async fn a_list_that_goes_back_is_an_error_not_an_endless_loop() {
        let answer = all_pages(|_| std::future::ready(Ok((vec![1], "a".to_owned())))).await;
        assert_eq!(answer.err().map(|s| s.code()), Some(tonic::Code::Internal));
    }

    #[test]
    fn a_full_page_of_the_largest_volumes_fits_grpcs_default_message_limit() {
        use crate::agent::{Volume, VolumeList};
        // IDs at the grammar's length limit, labels at Kubernetes' (63-byte keys and values).
        let volume = |i: usize| Volume {
            volume_id: format!("vol:{}:{i:0>200}", "p".repeat(40)),
            size_bytes: u64::MAX,
            chain_depth: u32::MAX,
            labels: (0..8).map(|l| (format!("{l:0>63}"), "v".repeat(63))).collect(),
            ..Default::default()
        };
        let list =
            VolumeList { volumes: (0..PAGE).map(volume).collect(), next_token: "n".repeat(253) };
        let size = list.encoded_len();
        assert!(size < 4 << 20, "a page of {PAGE} is {size} bytes");
    }
}
