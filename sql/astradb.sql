-- The Astra database schema (PostgreSQL), schema "astra".
--
--   psql "$(astra db url)" < sql/astradb.sql
--
-- Loading it again is safe: every statement creates only what is missing and nothing is ever
-- dropped, so it doubles as the upgrade script (`astra init` runs it).
--
-- The lineage tables follow Astra's original design (task, parameter, task_parameter,
-- output_interface, batch_interface, one table per method keyed by output_pk). Additions are
-- marked "added:" with the reason.

set client_min_messages = warning;

create schema if not exists astra;

create table if not exists astra.schema_version (
    version text primary key,
    applied timestamp not null default now()
);

-- Every output row of every method table has one pk here, so a task can point at its output
-- without naming the table that holds it.
create table if not exists astra.output_interface (
    pk bigserial primary key
);

-- added: sources (stars). Tasks that work on one source point at it; partitions of the
-- per-source assets are blocks of consecutive pk.
create table if not exists astra.source (
    pk bigserial primary key,
    source_id text not null unique,
    created timestamp not null default now()
);

create table if not exists astra.task (
    pk bigserial primary key,
    task_module text not null,
    -- Human-facing id "<Namespace>.<Family>_<first 8 hex of md5(params)>", as in Astra/luigi.
    task_id text not null,
    status_code int not null default 0,  -- 0 created, 1 success, 30 failure
    output_pk bigint references astra.output_interface(pk) on delete cascade,
    duration real,                       -- seconds of the task's own compute
    created timestamp not null default now(),
    modified timestamp not null default now(),
    -- added: 8 hex digits collide at survey scale, so the real key is a full sha256 of the
    -- family and the same canonical parameters (unique with task_module).
    task_hash text not null,
    -- added: why the task failed (status 30).
    error text,
    -- added: the source a per-source task worked on, the Dagster asset and run that ran it.
    source_pk bigint references astra.source(pk) on delete restrict,
    asset_key text,
    run_id text
);
create unique index if not exists task_module_task_hash_key on astra.task (task_module, task_hash);
create index if not exists task_task_id_idx on astra.task (task_id);
create index if not exists task_output_pk_idx on astra.task (output_pk);
create index if not exists task_source_asset_idx on astra.task (source_pk, asset_key)
    where source_pk is not null;

create table if not exists astra.parameter (
    pk bigserial primary key,
    parameter_name text not null,
    parameter_value text not null
);
-- Unique (name, value) pairs; md5 keeps the index small and allows values of any length.
create unique index if not exists parameter_name_value_key
    on astra.parameter (parameter_name, md5(parameter_value));

create table if not exists astra.task_parameter (
    pk bigserial primary key,
    task_pk bigint not null,        -- references astra.task(pk), enforced below
    parameter_pk bigint not null,   -- references astra.parameter(pk), enforced below
    unique (task_pk, parameter_pk)
);
create index if not exists task_parameter_parameter_pk_idx on astra.task_parameter (parameter_pk);

-- A batch (one Dagster run step over a block of sources) is a parent task; each source's task is
-- a child. Parent duration minus the sum of its children's durations is the batch overhead.
create table if not exists astra.batch_interface (
    pk bigserial primary key,
    parent_task_pk bigint not null,  -- references astra.task(pk), enforced below
    child_task_pk bigint not null,   -- references astra.task(pk), enforced below
    unique (parent_task_pk, child_task_pk)
);
create index if not exists batch_interface_child_task_pk_idx on astra.batch_interface (child_task_pk);

-- changed: task_parameter and batch_interface get tens of thousands of rows per batch. Their
-- references are checked once per statement (set-based, locking the referenced rows like a
-- foreign key does) instead of by row-level foreign keys, whose two lookups per row made the
-- links cost more than the results. Deleting a referenced task or parameter is refused
-- ("on delete restrict"), and primary keys of tasks and parameters cannot change.
create or replace function astra.check_link_references() returns trigger
language plpgsql as $$
declare
    wanted bigint;
    found bigint;
begin
    if tg_table_name = 'task_parameter' then
        select count(distinct task_pk) into wanted from new_links;
        select count(*) into found from (
            select 1 from astra.task t where t.pk in (select task_pk from new_links) for key share of t) x;
        if found <> wanted then
            raise foreign_key_violation using message = format(
                'astra.task_parameter: %s task_pk values reference no astra.task row', wanted - found);
        end if;
        select count(distinct parameter_pk) into wanted from new_links;
        select count(*) into found from (
            select 1 from astra.parameter p where p.pk in (select parameter_pk from new_links)
            for key share of p) x;
        if found <> wanted then
            raise foreign_key_violation using message = format(
                'astra.task_parameter: %s parameter_pk values reference no astra.parameter row',
                wanted - found);
        end if;
    else
        select count(*) into wanted from (
            select parent_task_pk from new_links union select child_task_pk from new_links) k;
        select count(*) into found from (
            select 1 from astra.task t where t.pk in (
                select parent_task_pk from new_links union select child_task_pk from new_links)
            for key share of t) x;
        if found <> wanted then
            raise foreign_key_violation using message = format(
                'astra.batch_interface: %s task pks reference no astra.task row', wanted - found);
        end if;
    end if;
    return null;
end $$;

create or replace trigger task_parameter_references_on_insert after insert on astra.task_parameter
    referencing new table as new_links for each statement execute function astra.check_link_references();
create or replace trigger task_parameter_references_on_update after update on astra.task_parameter
    referencing new table as new_links for each statement execute function astra.check_link_references();
create or replace trigger batch_interface_references_on_insert after insert on astra.batch_interface
    referencing new table as new_links for each statement execute function astra.check_link_references();
create or replace trigger batch_interface_references_on_update after update on astra.batch_interface
    referencing new table as new_links for each statement execute function astra.check_link_references();

create or replace function astra.refuse_delete_of_linked_rows() returns trigger
language plpgsql as $$
begin
    if tg_table_name = 'task' then
        if exists (select 1 from old_rows o join astra.task_parameter tp on tp.task_pk = o.pk)
           or exists (select 1 from old_rows o join astra.batch_interface b on b.parent_task_pk = o.pk)
           or exists (select 1 from old_rows o join astra.batch_interface b on b.child_task_pk = o.pk)
        then
            raise foreign_key_violation using
                message = 'astra.task rows are still referenced by task_parameter or batch_interface';
        end if;
    elsif exists (select 1 from old_rows o join astra.task_parameter tp on tp.parameter_pk = o.pk) then
        raise foreign_key_violation using
            message = 'astra.parameter rows are still referenced by task_parameter';
    end if;
    return null;
end $$;

create or replace function astra.refuse_primary_key_change() returns trigger
language plpgsql as $$
begin
    raise foreign_key_violation using message = format('%s.pk cannot change', tg_table_name);
end $$;

create or replace trigger task_refuse_delete_of_linked after delete on astra.task
    referencing old table as old_rows for each statement execute function astra.refuse_delete_of_linked_rows();
create or replace trigger parameter_refuse_delete_of_linked after delete on astra.parameter
    referencing old table as old_rows for each statement execute function astra.refuse_delete_of_linked_rows();
create or replace trigger task_refuse_pk_change before update of pk on astra.task
    for each row when (old.pk is distinct from new.pk) execute function astra.refuse_primary_key_change();
create or replace trigger parameter_refuse_pk_change before update of pk on astra.parameter
    for each row when (old.pk is distinct from new.pk) execute function astra.refuse_primary_key_change();

-- added: what a batch did with its block: how many sources it computed, skipped (already done
-- by an identical task) and failed.
create table if not exists astra.batch (
    task_pk bigint primary key references astra.task(pk) on delete cascade,
    partition_first text,
    partition_last text,
    n_sources int not null,
    n_computed int not null,
    n_skipped int not null,
    n_failed int not null
);

-- Method tables: one row per task output, one array element per spectrum of the source
-- (stacks first, then visits, as in the apStar file).

create table if not exists astra.random_number_generator (
    output_pk int primary key,
    samples real[],
    foreign key (output_pk) references astra.output_interface(pk) on delete restrict
);

create table if not exists astra.doppler (
    output_pk int primary key references astra.output_interface(pk) on delete restrict,
    vhelio real[],
    vrel real[],
    -- The original declared u_vrel as a scalar next to per-visit arrays; one per visit here.
    u_vrel real[],
    teff real[],
    u_teff real[],
    logg real[],
    u_logg real[],
    fe_h real[],
    u_fe_h real[],
    chisq real[],
    bc real[]
);

create table if not exists astra.apogeenet (
    output_pk int primary key references astra.output_interface(pk) on delete restrict,
    snr real[],
    teff real[],
    u_teff real[],
    logg real[],
    u_logg real[],
    fe_h real[],
    u_fe_h real[],
    bitmask_flag int[]
);

create table if not exists astra.ferre (
    output_pk int primary key references astra.output_interface(pk) on delete restrict,
    snr real[],
    frozen_teff boolean,
    frozen_logg boolean,
    frozen_metals boolean,
    frozen_log10vdop boolean,
    frozen_o_mg_si_s_ca_ti boolean,
    frozen_lgvsini boolean,
    frozen_c boolean,
    frozen_n boolean,
    initial_teff real[],
    initial_logg real[],
    initial_metals real[],
    initial_log10vdop real[],
    initial_o_mg_si_s_ca_ti real[],
    initial_lgvsini real[],
    initial_c real[],
    initial_n real[],
    teff real[],
    u_teff real[],
    logg real[],
    u_logg real[],
    metals real[],
    u_metals real[],
    log10vdop real[],
    u_log10vdop real[],
    o_mg_si_s_ca_ti real[],
    u_o_mg_si_s_ca_ti real[],
    lgvsini real[],
    u_lgvsini real[],
    c real[],
    u_c real[],
    n real[],
    u_n real[],
    log_chisq_fit real[],
    log_snr_sq real[],
    bitmask_flag int[]
);

create table if not exists astra.thecannon (
    output_pk int primary key references astra.output_interface(pk) on delete restrict,
    teff real
);

create table if not exists astra.thepayne (
    output_pk int primary key references astra.output_interface(pk) on delete restrict,
    snr real[],
    teff real[], u_teff real[],
    logg real[], u_logg real[],
    v_turb real[], u_v_turb real[],
    c_h real[], u_c_h real[],
    n_h real[], u_n_h real[],
    o_h real[], u_o_h real[],
    na_h real[], u_na_h real[],
    mg_h real[], u_mg_h real[],
    al_h real[], u_al_h real[],
    si_h real[], u_si_h real[],
    p_h real[], u_p_h real[],
    s_h real[], u_s_h real[],
    k_h real[], u_k_h real[],
    ca_h real[], u_ca_h real[],
    ti_h real[], u_ti_h real[],
    v_h real[], u_v_h real[],
    cr_h real[], u_cr_h real[],
    mn_h real[], u_mn_h real[],
    fe_h real[], u_fe_h real[],
    co_h real[], u_co_h real[],
    ni_h real[], u_ni_h real[],
    cu_h real[], u_cu_h real[],
    ge_h real[], u_ge_h real[],
    c12_c13 real[], u_c12_c13 real[],
    v_macro real[], u_v_macro real[],
    bitmask_flag int[]
);

insert into astra.schema_version (version) values ('1') on conflict do nothing;

-- Schema 2: data releases, their sources and files, and the spectra registered from them.

alter table astra.source add column if not exists ra double precision;
alter table astra.source add column if not exists dec double precision;

-- A data release is a folder of files with a manifest; registered once, never rewritten.
create table if not exists astra.data_release (
    pk bigserial primary key,
    name text not null unique,
    path text not null,
    manifest_sha256 text not null,
    n_sources int not null,
    n_files int not null,
    registered timestamp not null default now()
);

-- Which sources a release has, with a fingerprint over their files (it changes with a new visit).
create table if not exists astra.release_source (
    release_pk bigint not null references astra.data_release(pk) on delete cascade,
    source_pk bigint not null references astra.source(pk) on delete restrict,
    fingerprint text not null,
    primary key (release_pk, source_pk)
);
create index if not exists release_source_source_pk_idx on astra.release_source (source_pk, release_pk);

create table if not exists astra.release_file (
    pk bigserial primary key,
    release_pk bigint not null references astra.data_release(pk) on delete cascade,
    source_pk bigint not null references astra.source(pk) on delete restrict,
    path text not null,            -- relative to the release folder
    file_format text not null,     -- apStar, apVisit, mwmStar, mwmVisit, specLite
    sha256 text not null,
    size bigint not null,
    unique (release_pk, path)
);
create index if not exists release_file_source_pk_idx on astra.release_file (source_pk, release_pk);

-- The spectra asset's result table: one row per spectrum (a visit, or a stack row of an apStar
-- file) registered by a Spectra task for a source; methods read their inputs from here.
create table if not exists astra.spectrum (
    pk bigserial primary key,
    output_pk int not null references astra.output_interface(pk) on delete restrict,
    source_pk bigint not null references astra.source(pk) on delete restrict,
    release_pk bigint references astra.data_release(pk) on delete restrict,
    path text not null,            -- absolute path of the file
    file_format text not null,
    kind text not null check (kind in ('visit', 'stack')),
    frame text not null check (frame in ('observed', 'rest')),
    row_index int not null,        -- row (apStar, mwm) or 0 (apVisit) in the file
    snr real,
    mjd int,
    jd double precision,
    telescope text,
    fiber int,
    sha256 text not null           -- of the file: what the spectrum's tasks are fingerprinted on
);
create index if not exists spectrum_output_pk_idx on astra.spectrum (output_pk);
create index if not exists spectrum_source_pk_idx on astra.spectrum (source_pk);

insert into astra.schema_version (version) values ('2') on conflict do nothing;

-- Schema 3: trained models as task outputs, and the per-star results of the Doppler fit.

-- One row per trained model (Doppler templates, The Cannon, The Payne, FERRE grids, APOGEENet):
-- the file lives under ASTRA_HOME/models; the row says where, what class reads it, its checksum.
create table if not exists astra.model (
    output_pk int primary key references astra.output_interface(pk) on delete restrict,
    model_class text not null,     -- "module:Class" with a read(path) classmethod
    path text not null,
    sha256 text not null,
    size bigint not null,
    summary jsonb
);

-- added to doppler: per-visit flags, and the star's joint-fit velocity and its visit scatter.
alter table astra.doppler add column if not exists bitmask_flag int[];
alter table astra.doppler add column if not exists vhelio_star real;
alter table astra.doppler add column if not exists u_vhelio_star real;
alter table astra.doppler add column if not exists vscatter real;
alter table astra.doppler add column if not exists mjd int[];

insert into astra.schema_version (version) values ('3') on conflict do nothing;

-- Schema 4: the label tables. The original thecannon table was a placeholder with one scalar
-- teff; it becomes a per-spectrum table like the others (existing values become one-element
-- arrays, nothing is lost).
do $$
begin
    if (select data_type from information_schema.columns
        where table_schema = 'astra' and table_name = 'thecannon' and column_name = 'teff') = 'real' then
        alter table astra.thecannon
            alter column teff type real[] using case when teff is null then null else array[teff] end;
    end if;
end $$;
alter table astra.thecannon add column if not exists u_teff real[];
alter table astra.thecannon add column if not exists logg real[];
alter table astra.thecannon add column if not exists u_logg real[];
alter table astra.thecannon add column if not exists fe_h real[];
alter table astra.thecannon add column if not exists u_fe_h real[];
alter table astra.thecannon add column if not exists alpha_m real[];
alter table astra.thecannon add column if not exists u_alpha_m real[];
alter table astra.thecannon add column if not exists snr real[];
alter table astra.thecannon add column if not exists r_chi_sq real[];
alter table astra.thecannon add column if not exists bitmask_flag int[];

-- added to thepayne: [α/M] (what this Payne fits instead of separate α elements), the RV
-- offset fitted with the labels, and the fit quality.
alter table astra.thepayne add column if not exists alpha_m real[];
alter table astra.thepayne add column if not exists u_alpha_m real[];
alter table astra.thepayne add column if not exists rv real[];
alter table astra.thepayne add column if not exists u_rv real[];
alter table astra.thepayne add column if not exists r_chi_sq real[];

insert into astra.schema_version (version) values ('4') on conflict do nothing;

-- Schema 5: whether a release is synthetic (its manifest names the generator that made it; a
-- release without one is real data), recorded at registration so the doppler asset can pick
-- template families per release without reading manifests. NULL: registered before schema 5.
alter table astra.data_release add column if not exists synthetic boolean;

insert into astra.schema_version (version) values ('5') on conflict do nothing;

-- Schema 6: summary files (astraAllStar<Method>-<version>.fits/.parquet, astraAllVisitDoppler) as
-- the outputs of summary tasks: one row per file a task wrote, so a file's checksum and row count
-- lead back to the task (and its input fingerprint) that wrote it.
create table if not exists astra.summary_file (
    pk bigserial primary key,
    output_pk int not null references astra.output_interface(pk) on delete restrict,
    method text not null,          -- doppler, thecannon, thepayne, ferre, apogeenet
    release text not null,         -- astra.data_release.name
    product text not null,         -- astraAllStarTheCannon, astraAllVisitDoppler, ...
    file_format text not null,     -- fits, parquet, csv
    path text not null,
    sha256 text not null,
    size bigint not null,
    n_rows int not null,
    n_sources int not null,        -- sources with a result in the file
    n_missing int not null         -- sources of the release without a result
);
create index if not exists summary_file_output_pk_idx on astra.summary_file (output_pk);

insert into astra.schema_version (version) values ('6') on conflict do nothing;

-- Schema 7: provenance of every result in one row, for psql and TOPCAT users (`astra provenance`
-- reads the same view, so the two always agree). The label tasks name their spectra and model
-- tasks by task_id in their parameters (input_task_id, model_task_id; doppler: templates_task_id);
-- task_id is 8 hex and can collide, so a name resolves to the task of the same source (spectra)
-- or the one that holds a model row (model), newest first. The batch parent is the batch of the
-- run that wrote the result (the task's run_id), else the newest batch that linked the task.
-- A result whose task was recomputed with force (the task now points at a newer output) keeps
-- its row here with NULL task columns.
create or replace view astra.provenance as
with results as (
    select 'doppler'::text as method, output_pk from astra.doppler
    union all select 'thecannon', output_pk from astra.thecannon
    union all select 'thepayne', output_pk from astra.thepayne
    union all select 'ferre', output_pk from astra.ferre
    union all select 'apogeenet', output_pk from astra.apogeenet
)
select r.method, r.output_pk, t.pk as task_pk, t.task_id, s.source_id, t.status_code,
       it.task_id as input_task_id, it.pk as input_task_pk,
       mt.task_id as model_task_id, mt.pk as model_task_pk,
       bt.task_id as batch_task_id, bt.pk as batch_task_pk,
       t.run_id, t.created
from results r
left join astra.task t on t.output_pk = r.output_pk
left join astra.source s on s.pk = t.source_pk
left join lateral (
    select p.parameter_value from astra.task_parameter tp join astra.parameter p on p.pk = tp.parameter_pk
    where tp.task_pk = t.pk and p.parameter_name = 'input_task_id' limit 1) ip on true
left join lateral (
    select x.pk, x.task_id from astra.task x where x.task_id = ip.parameter_value
    order by (x.source_pk is not distinct from t.source_pk) desc, x.pk desc limit 1) it on true
left join lateral (
    select p.parameter_value from astra.task_parameter tp join astra.parameter p on p.pk = tp.parameter_pk
    where tp.task_pk = t.pk and p.parameter_name in ('model_task_id', 'templates_task_id') limit 1) mp on true
left join lateral (
    select x.pk, x.task_id from astra.task x where x.task_id = mp.parameter_value
    order by exists (select 1 from astra.model m where m.output_pk = x.output_pk) desc, x.pk desc
    limit 1) mt on true
left join lateral (
    select x.pk, x.task_id from astra.batch_interface b join astra.task x on x.pk = b.parent_task_pk
    where b.child_task_pk = t.pk
    order by (x.run_id is not distinct from t.run_id) desc, x.pk desc limit 1) bt on true;

insert into astra.schema_version (version) values ('7') on conflict do nothing;
