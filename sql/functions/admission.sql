-- Admission at send time: one idempotency key reaches fal at most once; one budget
-- admission, when the item is claimed for sending (batch_items.sent_at, claimed_by,
-- lease_until: sql/schema/20_batches.sql); the reconciler marks `unknown` only what a
-- sender that stopped left behind.

-- Dollars for people, as Python's `usd()`: at least cents, at most micro-dollars.
create or replace function rq_usd(p_micros bigint) returns text
language sql immutable parallel safe
as $$
  select '$' || case when length(split_part(t, '.', 2)) < 2
                     then split_part(t, '.', 1) || '.' || rpad(split_part(t, '.', 2), 2, '0')
                     else t end
  from (select rtrim(to_char(p_micros::numeric / 1000000,
                             'FM999,999,999,999,990.000000'), '0') as t) s
$$;

-- THE figures a budget decision reads, for one user and one UTC month: the budget row
-- (null: none), spent (completed generations created in the month: failed and canceled
-- rows cost 0 and hold nothing) and in flight (open generations of the month, plus items
-- admitted in the month with no generation row yet: pending after their send, or
-- `unknown`). Items recorded but not yet admitted hold nothing.
create or replace function rq_budget_figures(p_user_id bigint, p_month date,
                                  out limit_micros bigint, out actual_micros bigint,
                                  out in_flight_micros bigint)
language sql stable
as $$
  with b as (
    select p_month::timestamp at time zone 'utc' as start,
           (p_month::timestamp + interval '1 month') at time zone 'utc' as stop
  )
  select
    (select u.limit_micros from user_budgets u
     where u.user_id = p_user_id and u.month = p_month),
    (select coalesce(sum(g.cost_micros), 0) from generations g, b
     where g.user_id = p_user_id and g.created_at >= b.start and g.created_at < b.stop
       and g.status = 'completed')::bigint,
    ((select coalesce(sum(g.cost_micros), 0) from generations g, b
      where g.user_id = p_user_id and g.created_at >= b.start and g.created_at < b.stop
        and g.status in ('submitted', 'in_progress'))
     + (select coalesce(sum(i.estimate_micros), 0) from batch_items i, b
        where i.user_id = p_user_id and i.state in ('pending', 'unknown')
          and i.sent_at >= b.start and i.sent_at < b.stop))::bigint
$$;

-- THE admission: claim items for sending, now, each admitted against its user's budget of
-- the current UTC month (rq_now()) under the user's budget lock (the same transaction
-- lock for every path: batch runs, re-runs, resubmits, single submissions). An item is
-- claimable when it is pending, not sent, and unclaimed, claimed by `p_claimer`, or its
-- claimer's lease expired. An admitted item gets `sent_at`, the claim and a lease; one
-- that does not fit is rejected (`over_budget`, field `budget`) with the figures.
-- Items not returned were not claimable (someone else holds them, or they moved on).
-- `p_default_limit`: the budget of users without a `user_budgets` row (null: no cap).
create or replace function rq_claim_for_send(p_item_ids bigint[], p_claimer text, p_lease interval,
                                  p_default_limit bigint)
returns table (item_id bigint, admitted boolean, reason text)
language plpgsql
as $$
declare
  v_now timestamptz := rq_now();
  v_month date := date_trunc('month', v_now at time zone 'utc')::date;
  v_user record;
  v_fig record;
  v_in_flight bigint;
  v_total bigint;
  v_item record;
begin
  -- users with a cap this month, in user order (the lock order): decided item by item
  for v_user in
    select s.user_id, coalesce(b.limit_micros, p_default_limit) as cap,
           case when b.limit_micros is not null then 'monthly budget'
                else 'default budget' end as kind
    from (select distinct i.user_id from batch_items i where i.id = any(p_item_ids)) s
    left join user_budgets b on b.user_id = s.user_id and b.month = v_month
    where coalesce(b.limit_micros, p_default_limit) is not null
    order by s.user_id
  loop
    perform pg_advisory_xact_lock(
      hashtextextended('renderqueue:budget:' || v_user.user_id::text, 0));
    v_fig := rq_budget_figures(v_user.user_id, v_month);  -- read under the lock
    v_user.cap := coalesce(v_fig.limit_micros, p_default_limit);
    v_in_flight := v_fig.in_flight_micros;
    for v_item in
      select i.id, coalesce(i.estimate_micros, 0) as estimate
      from batch_items i
      where i.id = any(p_item_ids) and i.user_id = v_user.user_id and i.state = 'pending'
        and i.sent_at is null
        and (i.claimed_by is null or i.claimed_by = p_claimer or i.lease_until < v_now)
      order by i.id
      for update
    loop
      v_total := v_fig.actual_micros + v_in_flight + v_item.estimate;
      item_id := v_item.id;
      if v_total <= v_user.cap then
        v_in_flight := v_in_flight + v_item.estimate;
        update batch_items
        set sent_at = v_now, claimed_by = p_claimer, lease_until = v_now + p_lease,
            updated_at = v_now
        where id = v_item.id;
        admitted := true;
        reason := null;
      else
        admitted := false;
        reason := format('user %s over the %s %s for %s: spent %s + in flight %s + this row '
                         '%s = %s', v_user.user_id, v_user.kind, rq_usd(v_user.cap),
                         to_char(v_month, 'YYYY-MM'), rq_usd(v_fig.actual_micros),
                         rq_usd(v_in_flight), rq_usd(v_item.estimate), rq_usd(v_total));
        update batch_items
        set state = 'rejected', reason = rq_claim_for_send.reason, reject_kind = 'over_budget',
            reject_field = 'budget', updated_at = v_now
        where id = v_item.id;
      end if;
      return next;
    end loop;
  end loop;
  -- users without a cap: every item admitted in one statement, no figures read (the hot
  -- path: no budgets, many users)
  if p_default_limit is null then
    return query
      update batch_items i
      set sent_at = v_now, claimed_by = p_claimer, lease_until = v_now + p_lease,
          updated_at = v_now
      where i.id = any(p_item_ids) and i.state = 'pending' and i.sent_at is null
        and (i.claimed_by is null or i.claimed_by = p_claimer or i.lease_until < v_now)
        and not exists (select 1 from user_budgets b
                        where b.user_id = i.user_id and b.month = v_month)
      returning i.id, true, null::text;
  end if;
end
$$;
