//! The one markdown table the bench prints, and the functional failures that make it exit non-zero.

pub(crate) struct Row {
    pub(crate) order: u32,
    pub(crate) what: String,
    pub(crate) result: String,
    pub(crate) target: String,
    pub(crate) met: Option<bool>,
    pub(crate) cpu: String,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) failures: Vec<String>,
}

impl Report {
    pub(crate) fn row(
        &mut self,
        order: u32,
        what: &str,
        result: String,
        target: &str,
        met: Option<bool>,
        cpu: String,
    ) {
        eprintln!("bench: [{what}] {result}");
        self.rows.push(Row {
            order,
            what: what.to_string(),
            result,
            target: target.to_string(),
            met,
            cpu,
        });
    }

    /// A functional check: failing it makes the exit code non-zero.
    pub(crate) fn check(&mut self, ok: bool, what: String) -> bool {
        if !ok {
            eprintln!("bench: FUNCTIONAL FAILURE: {what}");
            self.failures.push(what);
        }
        ok
    }

    pub(crate) fn print(&mut self, quick: bool) {
        self.rows.sort_by_key(|r| r.order);
        println!();
        if quick {
            println!("(--quick: tiny N and ~1 s phases, a smoke test; the numbers mean nothing about speed)");
            println!();
        }
        println!("| measurement | result | target | met | CPU, % of one core (same phase) |");
        println!("| --- | --- | --- | --- | --- |");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            println!(
                "| {} | {} | {} | {} | {} |",
                r.what,
                r.result,
                if r.target.is_empty() {
                    "—"
                } else {
                    &r.target
                },
                met,
                if r.cpu.is_empty() { "—" } else { &r.cpu }
            );
        }
        println!();
    }
}
