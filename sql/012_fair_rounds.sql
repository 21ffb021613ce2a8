-- The fair claim in rounds: each pending job carries the round it is served in, so a claim is one
-- walk of an index in claim order, however many owners and jobs are waiting.
--
-- Before, every claim found the owners with pending jobs (a loose index scan over up to 1,000 of
-- them) and read each owner's oldest rows: 120-130 ms at 1,000 owners x 100 pending jobs, 1-2 ms
-- on a small backlog. Now the order is kept as the rows arrive: a job's `fair_round` is the round
-- it will be served in, and a claim takes the pending rows in (fair_round, created_at, id) order,
-- reading only the rows it takes (docs/benchmarks.md, "The claim's cost").
--
-- The rule, applied by the trigger below to every row that becomes pending:
-- - a new job goes one round after its owner's last pending job, or into the current round (the
--   lowest round still pending) when the owner has none waiting: every owner's next job comes
--   before anyone's following one, and within a round the oldest job comes first;
-- - a job put back to pending (a retry, a lease rescue, a claim whose forward failed) keeps its
--   round, or goes into the current round if its own is later (the rounds started again
--   meanwhile): it comes back as its owner's next job, where it was.
-- Rounds compare only among pending rows: when the queue empties they start again at 0.
-- Two owners' jobs inserted at the same moment may share a round; the order stays a total order
-- ((fair_round, created_at, id)), so no job is ever left behind.
--
-- Nullable with no default: adding it rewrites nothing. Pending rows get their round below, as the
-- old claim ranked them (each owner's oldest is round 0).

alter table imagen.jobs add column fair_round bigint;

update imagen.jobs j
set fair_round = ranked.round
from (
    select id, row_number() over (partition by owner_user_id order by created_at, id) - 1 as round
    from imagen.jobs
    where status = 'pending'
) ranked
where j.id = ranked.id;

-- Every pending row has its round: a pending row without one would never be claimed.
alter table imagen.jobs add constraint jobs_fair_round_check check (status <> 'pending' or fair_round is not null);

-- The claim walks jobs_claim_idx in order; the trigger reads the current round from its first
-- entry. Their predicates differ on purpose: the owner lookup below cannot be answered from
-- jobs_claim_idx, so a plan made while the statistics show an empty table (a fresh database's
-- first bulk insert) cannot pick it and filter through every pending row, once per inserted row.
create index jobs_claim_idx on imagen.jobs (fair_round, created_at, id)
    where status = 'pending' and fair_round is not null;
-- An owner's last pending round, an owner's pending jobs, and the count of pending jobs.
drop index imagen.jobs_pending_idx;
create index jobs_pending_idx on imagen.jobs (owner_user_id, fair_round) where status = 'pending';

-- SECURITY DEFINER: the current round is the lowest over every owner's pending jobs, which an
-- `authenticated` inserter may not read under row-level security.
create function imagen.jobs_fair_round() returns trigger
    language plpgsql
    security definer
    set search_path = ''
as $$
declare
    current_round bigint;
    owner_round bigint;
begin
    -- Both in the order of their index, LIMIT 1: one index entry each, not an aggregate.
    select j.fair_round into current_round
    from imagen.jobs j
    where j.status = 'pending' and j.fair_round is not null
    order by j.fair_round, j.created_at, j.id
    limit 1;
    if tg_op = 'INSERT' then
        select j.fair_round + 1 into owner_round
        from imagen.jobs j
        where j.status = 'pending' and j.owner_user_id = new.owner_user_id
        order by j.fair_round desc
        limit 1;
    end if;
    if tg_op = 'INSERT' then
        new.fair_round := greatest(coalesce(current_round, 0), coalesce(owner_round, 0));
    else
        new.fair_round := least(old.fair_round, coalesce(current_round, 0));
    end if;
    return new;
end
$$;

revoke all on function imagen.jobs_fair_round() from public, anon, authenticated;

create trigger jobs_fair_round_insert
    before insert on imagen.jobs
    for each row
    when (new.status = 'pending')
    execute function imagen.jobs_fair_round();

create trigger jobs_fair_round_requeue
    before update of status on imagen.jobs
    for each row
    when (new.status = 'pending' and old.status <> 'pending')
    execute function imagen.jobs_fair_round();
