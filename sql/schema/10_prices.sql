-- Prices are data: one row per endpoint (and resolution / audio where the price depends on
-- them), valid from `effective_from` until a newer row for the same key takes over.
-- cost = base_micros + round(max(seconds - base_seconds, 0) * micros_per_second)
create table prices (
  id bigserial primary key,
  endpoint text not null,
  resolution text,                  -- null: the price does not depend on resolution
  with_audio boolean,               -- null: the price does not depend on audio
  micros_per_second bigint not null check (micros_per_second >= 0),
  base_micros bigint not null default 0 check (base_micros >= 0),
  base_seconds numeric not null default 0 check (base_seconds >= 0),
  default_seconds numeric not null check (default_seconds > 0),
  default_resolution text,          -- what the model renders when the request names none
  -- Where the endpoint's documented output states the clip's length (a JSON path such as
  -- {video,duration}); null when fal documents no duration, as for Seedance. The ledger
  -- reads no output field fal does not document: without a path, a completion is priced
  -- from the requested (or default) seconds.
  output_seconds_path text[],
  effective_from timestamptz not null,
  price_version text not null,
  source text not null,
  unique nulls not distinct (endpoint, resolution, with_audio, effective_from)
);
create index prices_endpoint_idx on prices (endpoint, effective_from desc);

-- Public list prices (fal's pages, late 2026), as data with an effective date. A new
-- price is a new row with a later effective_from; old rows stay so that past generations
-- keep the price they were made at (the row in force at generations.created_at).
--
-- Seedance 2.0 is token-priced: $0.014 per 1k tokens, tokens = h * w * seconds * 24 / 1024.
-- 480p (854x480) and 1080p (1920x1080) follow the token formula exactly (134,505 and
-- 680,400 micro-dollars a second). 720p is the published $0.3034/s (the formula at
-- 1280x720 gives $0.3024/s; fal's published figure wins). The fast variant publishes
-- only 720p ($0.2419/s); its other resolutions are that price scaled by the token ratio,
-- rounded half up to the micro-dollar: 480p 241,900 * (854*480)/(1280*720) = 107,595.10
-- -> 107,595; 1080p 241,900 * 2.25 = 544,275 exactly.
-- "auto" duration is priced at the 15 s maximum. No seeded endpoint documents the
-- output's duration (output_seconds_path null), so completions are priced from the
-- requested or default seconds (cost_basis 'requested').
insert into prices (endpoint, resolution, with_audio, micros_per_second, base_micros,
                    base_seconds, default_seconds, default_resolution, effective_from,
                    price_version, source)
values
  ('bytedance/seedance-2.0/text-to-video', '480p', null, 134505, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11', 'token formula: 854*480*24/1024 tokens/s at $0.014/1k'),
  ('bytedance/seedance-2.0/text-to-video', '720p', null, 303400, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.3034/s at 720p'),
  ('bytedance/seedance-2.0/text-to-video', '1080p', null, 680400, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11', 'token formula: 1920*1080*24/1024 tokens/s at $0.014/1k'),
  ('bytedance/seedance-2.0/fast/text-to-video', '480p', null, 107595, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11',
   '720p fast price x 480p/720p token ratio: 107,595.10, rounded to the micro-dollar'),
  ('bytedance/seedance-2.0/fast/text-to-video', '720p', null, 241900, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.2419/s at 720p'),
  ('bytedance/seedance-2.0/fast/text-to-video', '1080p', null, 544275, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11', '720p fast price scaled by the 1080p/720p token ratio'),
  -- The seed article's example id, priced as Seedance 2.0 standard.
  ('fal-ai/seedance-2.0/text-to-video', '480p', null, 134505, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11', 'article example id; Seedance 2.0 standard prices'),
  ('fal-ai/seedance-2.0/text-to-video', '720p', null, 303400, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11', 'article example id; Seedance 2.0 standard prices'),
  ('fal-ai/seedance-2.0/text-to-video', '1080p', null, 680400, 0, 0, 15, '720p',
   '2026-01-01', 'fal-2026-11', 'article example id; Seedance 2.0 standard prices'),
  -- Veo 3.1: the price depends on resolution tier and audio (audio is on by default).
  ('fal-ai/veo3.1', '720p', false, 200000, 0, 0, 8, '720p',
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.20/s without audio'),
  ('fal-ai/veo3.1', '720p', true, 400000, 0, 0, 8, '720p',
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.40/s with audio'),
  ('fal-ai/veo3.1', '1080p', false, 200000, 0, 0, 8, '720p',
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.20/s without audio'),
  ('fal-ai/veo3.1', '1080p', true, 400000, 0, 0, 8, '720p',
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.40/s with audio'),
  ('fal-ai/veo3.1', '4k', false, 400000, 0, 0, 8, '720p',
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.40/s without audio at 4k'),
  ('fal-ai/veo3.1', '4k', true, 600000, 0, 0, 8, '720p',
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.60/s with audio at 4k'),
  ('fal-ai/kling-video/v3/turbo/pro/text-to-video', null, null, 140000, 0, 0, 5, null,
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.14/s'),
  ('fal-ai/kling-video/v2.5-turbo/pro/image-to-video', null, null, 70000, 350000, 5, 5, null,
   '2026-01-01', 'fal-2026-11', 'fal pricing page: $0.35 for the first 5 s, then $0.07/s');
